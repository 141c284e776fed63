"""Distill diffusers models and hand the students back to diffusers (optional extra ``fewstep[diffusers]``).

* :class:`DiffusersTeacher`: a local ``save_pretrained`` folder as a fewstep teacher (flow-matching and VP
  conventions mapped onto the linear path, :mod:`~fewstep.integrations.diffusers.conventions`).
* :class:`ConditionTable` / :func:`save_condition_table`: precomputed text embeddings addressed by ``cond`` ids.
* :func:`student_from_teacher`: a flow-map student initialised from the teacher's weights.
* :func:`export_student` / :func:`load_exported`: write the student as a diffusers folder and sample it.

Walk-through: docs/diffusers.md.
"""

from fewstep.integrations.diffusers.conditioning import ConditionTable, save_condition_table
from fewstep.integrations.diffusers.conventions import FlowConvention, VPConvention
from fewstep.integrations.diffusers.teacher import DiffusersTeacher

__all__ = ["DiffusersTeacher", "ConditionTable", "save_condition_table", "FlowConvention", "VPConvention"]
