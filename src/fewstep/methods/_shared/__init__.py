"""Machinery shared by several methods (kept out of the one-loss-per-file method modules).

* :mod:`~fewstep.methods._shared.flowmap_base`: base of the JVP / flow-map methods (meanflow, splitmeanflow, scm,
  facm, ayf): noisy inputs, teacher-or-data velocity with guidance, the student's JVP, the (t, s) draw.
* :mod:`~fewstep.methods._shared.flowmap_helpers`: their time samplers, adaptive weight, tangent normalisation.
* :mod:`~fewstep.methods._shared.reflow_family`: pair and marginal-alignment options, the pair-method base and the
  one MA term of reflow, reflow_distill and perflow; :mod:`~fewstep.methods._shared.pairs` (cached teacher pairs)
  and :mod:`~fewstep.methods._shared.alignment` (the MA surrogate).
* :mod:`~fewstep.methods._shared.dm` (distribution-matching loss terms), :mod:`~fewstep.methods._shared.dm_base`
  (the fake-score method base of dmd, dmd2, ddmd, cdm) and :mod:`~fewstep.methods._shared.ca_dm` (the CA + DM
  terms of ddmd and cdm).
"""
