"""Teachers: the analytic Gaussian mixture, wrappers for any network, and the exact teacher flow map."""

from .base import Teacher
from .flowmap import TeacherFlowMap
from .gmm import GaussianMixtureTeacher
from .module import ModuleTeacher
from .presets import PRESETS, load_preset

__all__ = ["Teacher", "GaussianMixtureTeacher", "TeacherFlowMap", "ModuleTeacher", "PRESETS", "load_preset"]
