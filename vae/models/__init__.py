"""Thin LightningModules: wiring and logging; the maths lives in ``vae.losses`` and ``vae.nn``."""

from vae.models.base import LatentVariableModule
from vae.models.gaussian_vae import GaussianVAE
from vae.models.text_lm import TextLanguageModel
from vae.models.text_vae import TextVAE
from vae.models.vqvae import VQVAE
from vae.models.vqvae_prior import VQVAEPrior

__all__ = [
    "GaussianVAE",
    "LatentVariableModule",
    "TextLanguageModel",
    "TextVAE",
    "VQVAE",
    "VQVAEPrior",
]
