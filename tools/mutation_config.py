"""What tools/mutation.py runs: each module's test files, and the surviving mutants argued equivalent.

``MODULES``: module (relative to src/fewstep) -> the tests that exercise it. ``EQUIVALENT``: mutmut mutant name ->
a one-line reason it cannot change any result (also in docs/mutation.md).
"""

from __future__ import annotations

#: module (relative to src/fewstep) -> the test files (or ``file::test`` node ids) that exercise it (relative to tests/)
MODULES: dict[str, list[str]] = {
    "core/paths.py": ["core/test_paths.py", "core/test_mutation_kills_paths.py"],
    "core/flowmap.py": ["core/test_flowmap.py", "core/test_mutation_kills_flowmap.py"],
    "sampling/samplers.py": ["sampling/test_samplers.py", "sampling/test_mutation_kills_samplers.py"],
    "sampling/logdensity.py": ["sampling/test_logdensity.py", "sampling/test_mutation_kills_logdensity.py"],
    "sampling/divergence.py": ["sampling/test_logdensity.py", "sampling/test_mutation_kills_logdensity.py"],
    "methods/_shared/alignment.py": [  # not the 23-s learned-teacher test
        *(f"methods/test_alignment.py::{t}" for t in (
            "test_surrogate_gradient_matches_closed_form_kl", "test_surrogate_gradient_is_exact_for_fixed_samples",
            "test_hutchinson_is_unbiased_for_divergence", "test_window_kl_vanishes_for_teacher_student",
            "test_bad_inputs_raise", "test_end_target_below_t_min_is_the_smoothed_marginal",
            "test_window_ending_at_zero_is_aligned_at_zero", "test_hutchinson_gradient_64d_within_5_percent_of_exact",
            "test_jump_mode_reports_folded_share")),
        "methods/test_perflow.py::test_perflow_ma_gradient_is_the_window_kl_gradient",
        "methods/test_mutation_kills_alignment.py",
        "methods/test_mutation_kills_alignment_targets.py",
    ],
    "methods/flow_matching.py": ["methods/test_reflow.py", "methods/test_mutation_kills_flow_matching.py"],
    "methods/base.py": [  # the Method contract and the one label dropout (flow_matching, the flow-map base, cd)
        "methods/test_mutation_kills_base.py", "methods/test_pair_classes.py",
        "methods/test_mutation_kills_flow_matching.py", "methods/test_cd_cond_drop.py"],
    "methods/reflow.py": ["methods/test_reflow.py", "methods/test_mutation_kills_reflow.py"],
    "methods/_shared/reflow_family.py": [  # the MA term lambda * L_MA of reflow, reflow_distill and perflow
        "methods/test_mutation_kills_reflow.py", "methods/test_mutation_kills_perflow.py",
        "methods/test_mutation_kills_reflow_family.py",
        "methods/test_perflow.py::test_perflow_ma_gradient_is_the_window_kl_gradient",
        *(f"methods/test_reflow.py::{t}" for t in (
            "test_reflow_distill_loss_falls_and_config_errors", "test_distill_loss_vanishes_for_exact_teacher_flow_map",
            "test_k_rectified_flow_uses_previous_student_as_teacher")),
    ],
    "methods/meanflow.py": ["methods/test_meanflow.py", "methods/test_mutation_kills_meanflow.py"],
    "methods/splitmeanflow.py": ["methods/test_splitmeanflow.py", "methods/test_mutation_kills_splitmeanflow.py"],
    "methods/shortcut.py": ["methods/test_shortcut.py", "methods/test_mutation_kills_shortcut.py"],
    "methods/ayf.py": [  # not the 7-s training tests (test_loss_falls_and_flow_map_improves)
        *(f"methods/test_ayf.py::{t}" for t in (
            "test_exact_flow_map_loss_vanishes", "test_emd_without_normalisation_equals_meanflow",
            "test_lmd_without_normalisation_matches_lagrangian_target", "test_warmup_and_normalisation_in_emd",
            "test_lmd_needs_a_teacher")),
        "methods/test_mutation_kills_ayf.py"],
    "methods/consistency.py": ["methods/test_consistency.py", "methods/test_mutation_kills_consistency.py",
                               "methods/test_ct_batch_velocity.py", "methods/test_cd_cond_drop.py",
                               "methods/test_consistency_curriculum.py"],
    "methods/_shared/batch_velocity.py": ["methods/test_ct_batch_velocity.py", "methods/test_imm_batch_interpolant.py"],
    "methods/scm.py": [  # not the training tests (test_consistency_error_falls, the 300-step weighting fit)
        *(f"methods/test_scm.py::{t}" for t in (
            "test_exact_consistency_model_loss_vanishes", "test_warmup_start_is_flow_matching_towards_v",
            "test_unnormalised_target_is_meanflow_with_s_zero", "test_config_validation",
            "test_t_one_fraction_puts_that_share_of_rows_at_t_max")),
        "methods/test_mutation_kills_scm.py"],
    "methods/imm.py": [  # not the training test (test_imm_learns_on_small_problem)
        *(f"methods/test_imm.py::{t}" for t in (
            "test_laplace_mmd_zero_for_identical_sets_positive_otherwise", "test_gradient_is_finite_at_zero_distance",
            "test_r_schedule_and_weight", "test_unbiased_loss_vanishes_in_expectation_at_exact_flowmap",
            "test_v_loss_at_exact_flowmap_vanishes_as_r_to_t", "test_ema_target_and_bad_inputs",
            "test_corner_fractions_draw_t_one_and_s_zero_groups")),
        "methods/test_mutation_kills_imm.py", "methods/test_imm_batch_interpolant.py"],
    "methods/facm.py": [  # not the training test (test_loss_falls_and_consistency_improves)
        *(f"methods/test_facm.py::{t}" for t in (
            "test_exact_student_loss_vanishes", "test_anchor_realisations",
            "test_loss_matches_the_formula_with_relaxation_and_clip", "test_config_validation",
            "test_t_one_fraction_rows_train_the_one_step_jump")),
        "methods/test_mutation_kills_facm.py"],
    "methods/perflow.py": [
        "methods/test_mutation_kills_perflow.py",
        *(f"methods/test_perflow.py::{t}" for t in (  # not the 9-s training tests (loss_falls)
            "test_window_targets_are_the_chord", "test_oracle_has_zero_window_loss", "test_perflow_config_errors",
            "test_average_velocity_student_sees_the_window_end", "test_perflow_ma_gradient_is_the_window_kl_gradient",
            "test_second_time_of_an_average_velocity_student",
            "test_end_fraction_keeps_the_whole_window_jump_on_that_share_of_rows")),
    ],
    "methods/cdm.py": [  # not the 15-s training test (test_cdm_learns_small_problem)
        *(f"methods/test_cdm.py::{t}" for t in (
            "test_euler_extrapolation_reuses_trajectory_noise", "test_gaussian_perturbation_statistics",
            "test_schedule_switch", "test_config_errors", "test_ablation_flags_select_terms",
            "test_zero_gradient_when_fake_is_real_without_guidance", "test_fake_ema_merge_moves_fake_towards_student",
            "test_finite_at_clamped_boundaries")),
        "methods/test_cdm_terms.py",
        "methods/test_mutation_kills_cdm.py",
        "methods/test_cdm_dm_at.py",
        "methods/test_cdm_offtraj_fake.py",
    ],
    "methods/dmd.py": ["methods/test_dmd.py", "methods/test_mutation_kills_dmd.py"],
    "methods/dmd2.py": ["methods/test_dmd.py", "methods/test_mutation_kills_dmd.py", "methods/test_dmd2_gan.py",
                        "methods/test_mutation_kills_dmd2.py"],
    "methods/_shared/gan.py": [  # DMD2's GAN head on the fake score's features
        "methods/test_dmd2_gan.py", "methods/test_mutation_kills_gan.py"],
    "methods/ddmd.py": ["methods/test_ddmd.py", "methods/test_mutation_kills_ddmd.py", "methods/test_ddmd_dm_at.py"],
    "methods/_shared/dm_base.py": [  # the DM method base of dmd, dmd2 (and, via ca_dm, ddmd and cdm)
        "methods/test_dmd.py", "methods/test_mutation_kills_dmd.py", "methods/test_ddmd.py",
        "methods/test_mutation_kills_ddmd.py", "methods/test_split_fake.py", "methods/test_dmd2_gan.py",
        "methods/test_mutation_kills_dm_base.py", "methods/test_dm_fresh_noise.py"],
    "methods/_shared/dm.py": [  # the DM / CA / fake-score formulas, schedules and backward simulation
        "methods/test_dmd.py", "methods/test_mutation_kills_dmd.py", "methods/test_ddmd.py",
        "methods/test_mutation_kills_ddmd.py", "methods/test_cdm_terms.py", "methods/test_mutation_kills_cdm.py",
        "methods/test_mutation_kills_dm.py", "methods/test_mutation_kills_dm_simulation.py",
        "methods/test_dm_fresh_noise.py"],
    "methods/_shared/ca_dm.py": [  # the CA + DM terms of ddmd and cdm
        "methods/test_ddmd.py", "methods/test_mutation_kills_ddmd.py", "methods/test_cdm_terms.py",
        "methods/test_mutation_kills_cdm.py", "methods/test_cdm_dm_at.py", "methods/test_ddmd_dm_at.py",
        "methods/test_split_fake.py",  # not test_shipped_configs_resolve: configs/ is not in the scratch copy
        "methods/test_cdm_offtraj_fake.py",  # dm_term's fake argument (CDM's dedicated off-trajectory fake)
        *(f"methods/test_ca_dm_fake_samples.py::{t}" for t in (
            "test_auto_rule", "test_explicit_values_are_kept_and_unknown_rejected"))],
    "methods/_shared/flowmap_helpers.py": [  # time samplers and weights of meanflow, splitmeanflow, scm, facm, ayf
        "methods/test_mutation_kills_flowmap_helpers.py", "methods/test_mutation_kills_meanflow.py",
        "methods/test_mutation_kills_scm.py", "methods/test_mutation_kills_facm.py"],
    "methods/_shared/flowmap_base.py": [  # the FlowMapTrain / AverageVelocity base of the five flow-map methods
        "methods/test_mutation_kills_flowmap_base.py", "methods/test_mutation_kills_meanflow.py",
        "methods/test_mutation_kills_splitmeanflow.py", "methods/test_mutation_kills_scm.py",
        "methods/test_mutation_kills_facm.py", "methods/test_mutation_kills_ayf.py"],
    "methods/_shared/pairs.py": [  # reflow pair generation / caching
        "methods/test_pairs.py", "methods/test_mutation_kills_pairs.py", "methods/test_mutation_kills_pairs_resume.py"],
}

#: surviving mutants argued equivalent: mutmut mutant name -> one-line reason (also listed in docs/mutation.md)
_P, _F = "fewstep.core.paths.xǁGeneralAffinePathǁ", "fewstep.core.flowmap.xǁ"
_PW, _AL = "fewstep.methods.perflow.xǁPerflowǁ", "fewstep.methods._shared.alignment.x_"
_SA, _LD = "fewstep.sampling.samplers.x_", "fewstep.sampling.logdensity.x_"
_DV = "fewstep.sampling.divergence.x_"  # split from logdensity.py (same function bodies, so the same mutant numbers)
_RF = "fewstep.methods._shared.reflow_family.xǁPairMethodǁ"
_LD_INC = "after check_grid(order='monotone') a grid whose last time is 1 is increasing: the second test is redundant"
_LD_DEC = "after check_grid(order='monotone') a grid whose first time is 1 is decreasing: the second test is redundant"
_LD_ZERO = "zeros in float32: ode_logdensity casts log_p_start to x's dtype, and 0 is exact in both"
_LD_PROBES = ("skipping ode_logdensity's probe check: velocity_and_divergence checks the probes with the same message "
              "on its first call")
_F64_TIMES = ("output times passed to torchdiffeq in float64 instead of the state's dtype: torchdiffeq casts t to "
              "the state's dtype in every call; only the step-size arithmetic's rounding differs")
_DEFAULT_T = 'as_time(t, x, ) uses the default name "t"'
_ONE_DEVICE = "device argument: the tests run on one device (CPU), where every tensor already lies on the target device"
_PA = "fewstep.methods._shared.pairs."
_PA_LOAD = ("generate_pairs' final load_pairs: the manifest it just wrote is built from the requested fingerprint and "
            "solver, is complete and lists exactly n rows, so the checks pass and the n cut is a no-op")
EQUIVALENT: dict[str, str] = {
    _P + "__init____mutmut_4": "boundary values checked in float32 instead of float64: far below the 1e-6 tolerance",
    _P + "__init____mutmut_6": "boundary values checked in float32 instead of float64: far below the 1e-6 tolerance",
    _F + "FlowMapǁF__mutmut_7": _DEFAULT_T,
    _F + "FlowMapǁforward__mutmut_9": _DEFAULT_T,
    _F + "VelocityFlowMapǁforward__mutmut_7": _DEFAULT_T,
    _F + "VelocityFlowMapǁvelocity__mutmut_12": _DEFAULT_T,
    _F + "FlowMapǁ_check_input__mutmut_35": _ONE_DEVICE + " (the always-taken branch casts to the same dtype)",
    _F + "FlowMapǁ_check_input__mutmut_39": _ONE_DEVICE,
    _F + "FlowMapǁ_check_input__mutmut_41": _ONE_DEVICE,
    "fewstep.methods.cdm.xǁCDMǁstudent_loss__mutmut_6": "anchor(batch, ) : grad=True is the default of anchor",
    "fewstep.methods.cdm.xǁCDMǁofftraj_prediction__mutmut_8": 'renoise_time(u, t_min=, t_max=) : kind="uniform" is '
                                                               "the default",
    "fewstep.methods.cdm.xǁCDMǁfake_loss__mutmut_54": 'renoise_time(u, t_min=, t_max=) : kind="uniform" is the default',
    "fewstep.methods.cdm.xǁCDMǁfake_loss__mutmut_4": "(anchor is None) or True: no caller passes an anchor to "
                                                     "CDM.fake_loss (DMMethod.loss calls fake_loss(batch))",
    "fewstep.methods.cdm.xǁCDMǁ__init____mutmut_44": "fake.copies[1] for copies[0]: SplitFake's copies are deep "
                                                     "copies of one network at construction, identical weights",
    "fewstep.methods._shared.alignment.x_ma_loss__mutmut_89": "create_graph=True dropped: it is the default",
    _AL + "window_logdensity__mutmut_28": _ONE_DEVICE,
    _AL + "window_logdensity__mutmut_31": _ONE_DEVICE,
    _AL + "window_logdensity__mutmut_36": _ONE_DEVICE,
    _AL + "window_logdensity__mutmut_39": _ONE_DEVICE,
    _AL + "window_logdensity__mutmut_48": "range(substeps + 2): the extra sub-grid time is never used",
    _SA + "_tvec__mutmut_4": _ONE_DEVICE,
    _SA + "_tvec__mutmut_8": _ONE_DEVICE,
    _SA + "solve_adaptive__mutmut_81": _ONE_DEVICE,
    _SA + "solve_adaptive__mutmut_83": _ONE_DEVICE,
    _SA + "solve_adaptive__mutmut_82": _F64_TIMES,
    _SA + "solve_adaptive__mutmut_84": _F64_TIMES,
    _SA + "renoise__mutmut_25": _ONE_DEVICE,
    _SA + "gamma_sample__mutmut_28": "tn < 0 instead of tn <= 0: at tn = 0 the gamma formula gives u = 0 exactly",
    _DV + "make_probes__mutmut_13": "±1 probes kept as integers before the final cast to x's dtype: same values",
    _DV + "make_probes__mutmut_18": "randint(2, shape) is randint(0, 2, shape)",
    _DV + "make_probes__mutmut_37": _ONE_DEVICE,
    _DV + "make_probes__mutmut_39": _ONE_DEVICE,
    _DV + "divergence__mutmut_7": _ONE_DEVICE,
    _DV + "divergence__mutmut_10": _ONE_DEVICE,
    _DV + "divergence__mutmut_13": "expanding a (batch,) time tensor to (batch,) is a no-op",
    _LD + "likelihood__mutmut_35": _LD_INC,
    _LD + "likelihood__mutmut_36": _LD_INC,
    _LD + "likelihood__mutmut_41": _LD_ZERO,
    _LD + "likelihood__mutmut_44": _LD_ZERO,
    _LD + "likelihood__mutmut_42": _ONE_DEVICE,
    _LD + "likelihood__mutmut_45": _ONE_DEVICE,
    _LD + "ode_logdensity__mutmut_20": _ONE_DEVICE,
    _LD + "ode_logdensity__mutmut_23": _ONE_DEVICE,
    _LD + "ode_logdensity__mutmut_56": _ONE_DEVICE,
    _LD + "ode_logdensity__mutmut_60": _ONE_DEVICE,
    _LD + "ode_logdensity__mutmut_44": _LD_PROBES,
    _LD + "ode_logdensity__mutmut_45": _LD_PROBES,
    **{_DV + f"velocity_and_divergence__mutmut_{i}": _ONE_DEVICE for i in (41, 44, 92, 95)},
    **{_LD + f"ode_logdensity__mutmut_{i}": _ONE_DEVICE for i in (194, 197)},
    **{_RF + f"take_pairs__mutmut_{i}": _ONE_DEVICE for i in (7, 9, 11, 13, 17)},
    **{_RF + f"prepare__mutmut_{i}": "fingerprint dropped or None: ensure_pairs / generate_pairs fall back to "
       "teacher_fingerprint(teacher), the same value (48, 55 before pair_classes)" for i in (42, 49)},
    **{_RF + f"prepare__mutmut_{i}": "rank-0-writes / other-ranks-load branch: in one process the fallback "
       "ensure_pairs call writes or loads the same pairs (observable only under torchrun with several ranks; "
       "99, 103-108 before pair_classes)" for i in (93, 97, 98, 99, 100, 101, 102)},
    "fewstep.methods.shortcut.x_shortcut_target__mutmut_6": "t - 2d <= -1e-6 vs < -1e-6: differs on an exact tie only",
    **{f"fewstep.methods.shortcut.xǁShortcutǁloss__mutmut_{i}": "the level k kept as an integer: 2^(+-k) is a power "
       "of two, exact in the float32 the integer power returns" for i in (26, 35)},
    "fewstep.methods.shortcut.xǁShortcutǁloss__mutmut_87": "d <= d_min*1.0001 vs <: d is a power of two, "
    "d_min*1.0001 is not, so they are never equal",
    _LD + "ode_logdensity__mutmut_211": "odeint(...)[+1] of a two-point time span is its last entry",
    _LD + "ode_logdensity__mutmut_120": "traj and ltraj are both lists or both None, so 'or' equals 'and'",
    _LD + "sample_with_logdensity__mutmut_20": _LD_DEC,
    _LD + "sample_with_logdensity__mutmut_21": _LD_DEC,
    "fewstep.methods._shared.alignment.x__end_times__mutmut_2": "t_end <= t_min: at t_end = t_min, c = 1 and the "
    "score time is t_end either way",
    **{f"fewstep.methods.dmd.xǁDMDǁprepare__mutmut_{i}": _ONE_DEVICE for i in (35, 37, 47)},  # 47: 54 before
    "fewstep.methods.dmd.xǁDMDǁprepare__mutmut_52": "randint(K, shape) is randint(0, K, shape) (59 before "
    "pair_classes)",
    "fewstep.methods.dmd.xǁDMDǁregression_loss__mutmut_7": _ONE_DEVICE,
    "fewstep.methods.dmd.xǁDMDǁregression_loss__mutmut_8": "clamp(None, N - 1): u >= 0, so the pair index is never "
    "below 0",
    "fewstep.methods.ddmd.xǁDecoupledDMDǁstudent_loss__mutmut_5": "anchor(batch, ) : grad=True is the default "
    "of anchor",
    "fewstep.methods._shared.ca_dm.xǁCADMMethodǁdm_anchor__mutmut_10": "anchor(batch, final=True) : grad=True is the "
    "default of anchor",
    "fewstep.methods.ddmd.xǁDecoupledDMDǁstudent_loss__mutmut_15": "dm_anchor(batch, None): with dm_at=every it "
    "returns "
    "None, and ca_dm_loss takes a None DM anchor as the CA anchor a; with dm_at=final the argument is not read",
    "fewstep.methods._shared.ca_dm.xǁCADMMethodǁdm_term__mutmut_30": "dm_terms(..., cond, ) : guidance 1.0 is "
    "the default (numbered 25 before dm_term's fake argument)",
    "fewstep.methods._shared.ca_dm.xǁCADMMethodǁdm_term__mutmut_42": 'dm_loss(..., floor, ) : "dmd2" is the default '
    "(numbered 37 before fake_split, 38 before dm_term's fake argument)",
    "fewstep.methods._shared.ca_dm.xǁCADMMethodǁca_dm_loss__mutmut_10": 'n_dm = "" instead of None: ca_term reads '
    "n_dm only when ca_norm='dm', where dm_term always sets it",
    **{f"fewstep.methods._shared.dm_base.xǁDistributionMatchingMethodǁ{k}": r for k, r in (
        ("anchor__mutmut_8", "torch.full with an integer fill and dtype=None is int64, torch.long"),
        ("anchor__mutmut_12", "torch.full with an integer fill and no dtype is int64, torch.long"),
        ("anchor__mutmut_9", _ONE_DEVICE), ("anchor__mutmut_13", _ONE_DEVICE),
        ("dm_student_loss__mutmut_8", "anchor(batch, ) : grad=True is the default of anchor (6 before the anchor "
         "argument)"),
        ("dm_student_loss__mutmut_17", 'renoise_time(u, t_min=.., t_max=..): kind "uniform" is the default (14 '
         "before the anchor argument)"),
        ("fake_loss__mutmut_12", 'renoise_time(u, t_min=.., t_max=..): kind "uniform" is the default (18 before '
         "fake_split)"),
        ("dm_student_loss__mutmut_46", 'dm_loss(..., floor, ) : "dmd2" is the default (42 before the anchor '
         "argument)"),
        ("sampler_for__mutmut_6", "SamplerSpec(gamma=1.0, ) drops grid=cls.sampler.grid: every DM method's own "
         'sampler grid is "uniform", the SamplerSpec default'))},
    "fewstep.methods.consistency.x_consistency_grid__mutmut_12": "time_grid(n, 1.0, kind=.., rho=..): t_end 0.0 "
    "is the default",
    "fewstep.methods.consistency.xǁ_ConsistencyBaseǁtimes__mutmut_9": _ONE_DEVICE + " (the grid is moved to u's "
    "device; numbered 7 before the run-length curriculum)",
    "fewstep.methods.consistency.xǁ_ConsistencyBaseǁprepare__mutmut_1": "super().prepare(None): Method.prepare is "
    "an empty hook that reads nothing",
    **{f"fewstep.methods.consistency.xǁ_ConsistencyBaseǁtimes__mutmut_{i}": "clamp(None, n - 1): u >= 0 and "
       "max(c - 1, 0) >= 0, so the grid index is never below 0 (numbered 17, 33 before the run-length curriculum)"
       for i in (19, 35)},
    "fewstep.methods.ayf.xǁAYFLagrangianǁtangent__mutmut_27": "velocity(x_s, s, None, cond): ayf_lmd always "
    "distils (its constructor refuses otherwise), so velocity() never reads dx",
    **{f"fewstep.methods._shared.dm.x_backward_simulate__mutmut_{i}": _ONE_DEVICE + " (57, 61, 67, 71, 97 before "
       "fresh_noise)" for i in (58, 62, 68, 72, 117)},
    "fewstep.methods._shared.dm.x_backward_simulate__mutmut_53": "range(1) instead of range(0) for an empty batch: "
    "one student step on zero rows, which changes nothing (52 before fresh_noise)",
    "fewstep.methods._shared.dm.x_anchor_index__mutmut_1": "clamp(None, n - 1): u >= 0, so the anchor index is "
    "never below 0",
    **{f"fewstep.methods._shared.dm.x_dynamic_schedule__mutmut_{i}": "the end points 1 and 0 built in the default "
       "float32: both exact, and torch.cat promotes them to the float64 of the inner times (even when those are "
       "empty)" for i in (59, 61, 64, 66)},
    "fewstep.methods.scm.xǁSCMǁloss__mutmut_63": "F(x_t, t, 1.0): the consistency parameterization feeds the "
    "backbone s' = 0 whatever s is",
    "fewstep.methods.scm.xǁTimeWeightingǁforward__mutmut_2": "emb(t).to(None): the embedding has the dtype of its "
    "freqs buffer, which follows the module's dtype like the linear layer's",
    **{f"fewstep.methods.imm.x_laplace_mmd2__mutmut_{i}": "the default estimator 'v' renamed: every value other "
       "than 'u' takes the V-statistic branch" for i in (1, 2)},
    "fewstep.methods.imm.x_laplace_mmd2__mutmut_64": "k_tr.transpose(2, 2) (no transpose): the mean over all pairs, "
    "and the sum over the symmetric i != j mask, of k_tr^T equal those of k_tr",
    **{f"fewstep.methods.imm.x_laplace_mmd2__mutmut_{i}": _ONE_DEVICE for i in (73, 76)},
    "fewstep.methods.facm.xǁFACMǁ__init____mutmut_10": "getattr(net, 'use_s', None) is not False: None, like the "
    "default True, is not False",
    "fewstep.methods.facm.xǁFACMǁloss__mutmut_74": "F(x_t, t, 1.0): the consistency parameterization feeds the "
    "backbone s' = 0 whatever s is",
    **{f"fewstep.methods.facm.xǁFACMǁloss__mutmut_{i}": "a per-sample mean replaced by the batch mean: every sample "
       "has the same size, so fm.mean() and the logged means are unchanged" for i in (106, 119)},
    "fewstep.methods.facm.xǁFACMǁloss__mutmut_129": "cosine_similarity(.., dim=1) dropped: dim=1 is the default",
    _PW + "window_starts__mutmut_6": "clamp(None, K - 1): u >= 0, so the window index is never below 0",
    _PW + "window_starts__mutmut_15": _ONE_DEVICE + " (the grid is moved to x1's device)",
    _PW + "window_starts__mutmut_17": _ONE_DEVICE + " (the grid is moved to x1's device)",
    _PW + "window_starts__mutmut_20": _ONE_DEVICE + " (the grid is moved to x1's device)",
    _PW + "window_starts__mutmut_22": _ONE_DEVICE + " (the grid is moved to x1's device)",
    _PA + "xǁPairsǁtake__mutmut_2": "clamp(None, N-1): u >= 0, the pair index is never negative",
    _PA + "x__solve_teacher__mutmut_14": "solve_adaptive(v, x1, 1.0, ...) : t_end = 0.0 is the default",
    _PA + "x_generate_pairs__mutmut_31": "getattr(teacher, 'event_shape', None) or (): None or () is (), as () or ()",
    _PA + "x_generate_pairs__mutmut_198": "randint(K, shape) is randint(0, K, shape)",
    _PA + "x_generate_pairs__mutmut_208": "rand <= uncond_fraction: differs only on an exact tie of a float32 uniform",
    _PA + "x_generate_pairs__mutmut_238": ".to(None) is a no-op and x0[sl] = ... casts to x0's dtype anyway",
    **{_PA + f"x_generate_pairs__mutmut_{i}": _PA_LOAD for i in (316, 317, 318, 319, 321, 322, 323, 324, 327)},
}

_BV = "fewstep.methods._shared.batch_velocity.x_batch_velocity__mutmut_"
_BV_ROW = "changes only a term constant along each row of the logits, which the softmax over the batch removes"
EQUIVALENT.update({
    _BV + "15": _BV_ROW + " (|x_t|^2 summed over all rows: one constant)",
    _BV + "20": _BV_ROW + " (sum of x_t^3 instead of |x_t|^2)",
    _BV + "48": 'float("-INF") is float("-inf")',
})

_GAN = "fewstep.methods._shared.gan.x"
EQUIVALENT.update({
    **{_GAN + f"ǁGANHeadǁ__init____mutmut_{i}": _ONE_DEVICE + " (the head's dry forward and its layers)"
       for i in (5, 8, 21, 25, 42, 44)},
    **{_GAN + f"ǁGANHeadǁ__init____mutmut_{i}": "tau of the dry forward in the default float32: the dry forward "
       "only sizes the head, and the bottleneck's shape does not depend on tau's dtype" for i in (22, 26)},
    _GAN + "ǁGANHeadǁ__init____mutmut_39": "_pool(raw).shape[+1]: the pooled features are (1, F), shape[1] is "
    "shape[-1]",
    _GAN + "ǁGANHeadǁforward__mutmut_3": "squeeze(+1) of the (B, 1) logits is squeeze(-1)",
    **{_GAN + f"_bottleneck__mutmut_{i}": "len(net.net) <= 2 / < 3 for < 2: an MLP's net has 1 + 2 depth layers (odd), "
       "so the three tests agree" for i in (1, 2)},
    **{_GAN + f"_discriminator_loss__mutmut_{i}": "the logged accuracy with >= 0 / <= 0: differs only on a logit "
       "exactly 0" for i in (47, 50)},
})

_D2 = "fewstep.methods.dmd2.xǁDMD2ǁ"
EQUIVALENT.update({
    **{_D2 + k: 'renoise_time(u, t_min=.., t_max=..): kind "uniform" is the default'
       for k in ("fake_loss__mutmut_23", "fake_loss__mutmut_34", "student_loss__mutmut_20")},
    _D2 + "student_loss__mutmut_5": "anchor(batch, ) : grad=True is the default of anchor",
})
