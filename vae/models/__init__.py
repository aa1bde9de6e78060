"""Thin LightningModules: wiring and logging; the maths lives in ``vae.losses`` and ``vae.nn``.

The Gaussian VAE and its KL-centred variants (one file each, ``model=<name>``):
``GaussianVAE`` (vae), ``IWAE`` (iwae), ``BetaTCVAE`` (beta_tcvae), ``VampPriorVAE``
(vampprior), ``LadderVAE`` (ladder_vae); then ``VQVAE`` and its prior, and the text models.
"""

from vae.models.base import LatentVariableModule
from vae.models.beta_tcvae import BetaTCVAE
from vae.models.gaussian_vae import GaussianVAE
from vae.models.iwae import IWAE
from vae.models.ladder_vae import LadderVAE
from vae.models.text_lm import TextLanguageModel
from vae.models.text_vae import TextVAE
from vae.models.vampprior import VampPriorVAE
from vae.models.vqvae import VQVAE
from vae.models.vqvae_prior import VQVAEPrior

__all__ = [
    "BetaTCVAE",
    "GaussianVAE",
    "IWAE",
    "LadderVAE",
    "LatentVariableModule",
    "TextLanguageModel",
    "TextVAE",
    "VampPriorVAE",
    "VQVAE",
    "VQVAEPrior",
]
