"""A small VQ-f4 autoencoder on scikit-learn's bundled digits (8x8 upscaled to 32x32): trains on CPU in minutes."""

from configs import base


def get_config():
    model = base.autoencoder_model("vq", ch_mult=(1, 2, 2), z_channels=3, embed_dim=3, n_embed=256, ch=32,
                                   num_res_blocks=1, resolution=32)
    loss = base.autoencoder_loss(perceptual_weight=0.0, disc_start=1000, disc_weight=0.75, codebook_weight=1.0,
                                 disc_num_layers=2, disc_ndf=32)
    stage = base.autoencoder_stage(model, loss, batch_size=32, learning_rate=1e-3)
    stage.train.num_steps = 2000
    stage.train.log_every = 50
    stage.train.image_every = 500
    stage.train.checkpoint_every = 500
    return base.experiment(("autoencoder",), base.data_config("digits", resolution=32), stage)
