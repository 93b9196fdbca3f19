"""VQ-f4 autoencoder (LDM ``vq-f4``, the CelebA-HQ/FFHQ/LSUN-bedrooms first stage): 256x256x3 -> 64x64x3.

8192 codes of dimension 3. Reference: rFID 0.58, PSNR 27.43 after 533,066 steps; 22.34M + 32.96M params.
Trained with the taming VQ loss: disc_start 0, disc_weight 0.75, codebook_weight 1.0, batch 8, Adam(0.5, 0.9),
base_learning_rate 4.5e-6 x batch 8 (--scale_lr, one GPU) = 3.6e-5.
"""

from configs import base


def get_config():
    model = base.autoencoder_model("vq", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192)
    loss = base.autoencoder_loss(disc_start=0, disc_weight=0.75, codebook_weight=1.0)
    return base.reference_autoencoder_experiment(model, loss, batch_size=8, learning_rate=3.6e-5)
