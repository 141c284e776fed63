"""fewstep: distill flow-matching and diffusion teachers into 1-4-step flow-map students.

Notation: data x0 at t=0, noise x1 at t=1, x_t = (1-t) x0 + t x1, sampling from t=1 down to 0; every
student is a flow map f_{t->s}(x) = c_skip x + c_out F_theta(x, t, s) with f_{t->t} = identity.
"""

from fewstep.api import train
from fewstep.core.flowmap import FlowMap, VelocityFlowMap
from fewstep.core.paths import AffinePath, CosinePath, GeneralAffinePath, LinearPath, cfg_combine, get_path
from fewstep.networks.mlp import MLP
from fewstep.sampling.samplers import gamma_sample, sample_flowmap, solve, solve_adaptive, time_grid
from fewstep.teachers import PRESETS, GaussianMixtureTeacher, ModuleTeacher, Teacher, TeacherFlowMap, load_preset
from fewstep.training.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "AffinePath", "LinearPath", "CosinePath", "GeneralAffinePath", "cfg_combine", "get_path",
    "FlowMap", "VelocityFlowMap", "MLP",
    "Teacher", "GaussianMixtureTeacher", "TeacherFlowMap", "ModuleTeacher", "load_preset", "PRESETS",
    "Trainer", "train",
    "solve", "solve_adaptive", "sample_flowmap", "gamma_sample", "time_grid",
]
