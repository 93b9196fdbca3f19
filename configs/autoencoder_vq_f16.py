"""VQ-f16 autoencoder (LDM ``vq-f16``): 256x256x3 -> 16x16x8, attention at 16^2. Reference rFID 5.15."""

from configs import base


def get_config():
    model = base.autoencoder_model("vq", ch_mult=(1, 1, 2, 2, 4), z_channels=8, embed_dim=8, n_embed=16384,
                                   attn_resolutions=(16,))
    loss = base.autoencoder_loss(disc_start=250001, disc_weight=0.75, codebook_weight=1.0, disc_num_layers=2)
    return base.reference_autoencoder_experiment(model, loss, batch_size=8, learning_rate=3.6e-5)
