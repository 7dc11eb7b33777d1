"""Regression on the sphere (Petrini, Cagnetta, Vanden-Eijnden, Wyart): docs/sphere.md.

harmonics.py: Gegenbauer polynomials, harmonic dimensions, Funk-Hecke degree coefficients;
field.py: uniform points, the exact Gaussian random field sampler;
predictors.py: the one-hidden-layer ReLU net and its predictors (trained lazy/feature, Theta_inf, eNTK);
exponents.py: predicted learning-curve exponents and power-law fits.
The spectrum tools (eigenpairs, degree content, alignment) are ntk_fast.spectrum.
"""
from ntk_fast.sphere.harmonics import degree_coefficients, gegenbauer, gegenbauer_nodes, harmonic_dim, harmonic_dims
from ntk_fast.sphere.field import (FieldSample, check_on_sphere, choose_degree, field_covariance, sample_field,
                                   sample_sphere, target_power)
from ntk_fast.sphere.exponents import fit_exponent, predicted_exponents

__all__ = ["FieldSample", "check_on_sphere", "choose_degree", "degree_coefficients", "field_covariance",
           "fit_exponent", "gegenbauer", "gegenbauer_nodes", "harmonic_dim", "harmonic_dims", "predicted_exponents",
           "sample_field", "sample_sphere", "target_power"]
