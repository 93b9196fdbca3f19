"""VQ-f8 autoencoder (LDM ``vq-f8``, the cin-ldm-vq-f8 first stage): 256x256x3 -> 32x32x4, attention at 32^2.

16384 codes; 2-layer PatchGAN, disc_start 1, disc_weight 0.6. Reference rFID 1.14; 27.4M + 40.3M params.
"""

from configs import base


def get_config():
    model = base.autoencoder_model("vq", ch_mult=(1, 2, 2, 4), z_channels=4, embed_dim=4, n_embed=16384,
                                   attn_resolutions=(32,))
    loss = base.autoencoder_loss(disc_start=1, disc_weight=0.6, codebook_weight=1.0, disc_num_layers=2)
    return base.reference_autoencoder_experiment(model, loss, batch_size=8, learning_rate=3.6e-5)
