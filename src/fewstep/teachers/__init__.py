"""Teachers: the analytic Gaussian mixture, wrappers for any network, and the exact teacher flow map."""

from fewstep.teachers.base import Teacher
from fewstep.teachers.flowmap import TeacherFlowMap
from fewstep.teachers.gmm import GaussianMixtureTeacher
from fewstep.teachers.module import ModuleTeacher
from fewstep.teachers.presets import PRESETS, load_preset

__all__ = ["Teacher", "GaussianMixtureTeacher", "TeacherFlowMap", "ModuleTeacher", "PRESETS", "load_preset"]
