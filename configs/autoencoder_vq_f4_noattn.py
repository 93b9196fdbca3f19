"""VQ-f4 without attention (LDM ``vq-f4-noattn``, the inpainting first stage). Reference rFID 1.06."""

from configs import base


def get_config():
    model = base.autoencoder_model("vq", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192, attn_type="none")
    loss = base.autoencoder_loss(disc_start=11, disc_weight=0.75, codebook_weight=1.0)
    return base.reference_autoencoder_experiment(model, loss, batch_size=8, learning_rate=3.6e-5)
