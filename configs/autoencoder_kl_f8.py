"""KL-f8 autoencoder (LDM ``kl-f8``, the Stable Diffusion first stage): 256x256x3 -> 32x32x4.

Reference: rFID 0.90, PSNR 24.19 after 246,803 steps; 34.16M + 49.49M params. The CompVis training config
(``autoencoder_kl_32x32x4``) uses batch 12 with 2 accumulated batches and base_learning_rate 4.5e-6, which its
--scale_lr turns into 1.08e-4 on one GPU; here that is written out as batch 24 and lr 1.08e-4.
"""

from configs import base


def get_config():
    model = base.autoencoder_model("kl", ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4)
    loss = base.autoencoder_loss(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    return base.reference_autoencoder_experiment(model, loss, batch_size=24, learning_rate=1.08e-4)
