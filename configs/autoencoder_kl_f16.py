"""KL-f16 autoencoder (LDM ``kl-f16``): 256x256x3 -> 16x16x16, attention at 16^2. Reference rFID 0.87."""

from configs import base


def get_config():
    model = base.autoencoder_model("kl", ch_mult=(1, 1, 2, 2, 4), z_channels=16, embed_dim=16, attn_resolutions=(16,))
    loss = base.autoencoder_loss(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    return base.reference_autoencoder_experiment(model, loss, batch_size=24, learning_rate=1.08e-4)
