"""Evaluation: sample metrics, one-call evaluation of students and solvers, digit features, diagnostics."""

from fewstep.evaluation.evaluate import evaluate_flowmap, evaluate_samples, evaluate_teacher_solver

__all__ = ["evaluate_flowmap", "evaluate_samples", "evaluate_teacher_solver"]
