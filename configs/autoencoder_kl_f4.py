"""KL-f4 autoencoder (LDM ``kl-f4``): 256x256x3 -> 64x64x3. Reference rFID 0.27, PSNR 27.53.

The released model was trained on OpenImages (not shipped by CompVis); point ``data.path`` at your images.
CompVis base_learning_rate 4.5e-6 with --scale_lr on one GPU and batch 12 x 2 accumulated: 1.08e-4 at 24/step.
"""

from configs import base


def get_config():
    model = base.autoencoder_model("kl", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3)
    loss = base.autoencoder_loss(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    return base.reference_autoencoder_experiment(model, loss, batch_size=24, learning_rate=1.08e-4)
