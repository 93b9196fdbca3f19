"""Text-to-image on scikit-learn's digits: the quickstart's two stages, stage 2 conditioned on captions.

Every training digit comes with a caption in one of eight phrasings (``lidiff.data.captions.DIGIT_TEMPLATES``:
"a handwritten seven", "the digit 7", "number 7", ...). A WordPiece vocabulary is trained on those captions at the
start of stage 2 (``build_vocab``, saved in ``<workdir>/diffusion/tokenizer``), prompts become 12 token ids
(``[CLS] words [SEP] [PAD]...``) and a small transformer tau_theta (2 layers, width 64, 4 heads x 16), trained
jointly with the UNet, turns them into the cross-attention context. 10% of the captions are replaced by the empty
prompt in training, so sampling can use classifier-free guidance (scale 5).

Stage 1 and the UNet are the quickstart's (``configs/quickstart.py``); only the data source and the conditioning
differ. The final samples are 4 per prompt for 30 prompts, 3 phrasings of each digit (``digit_prompts``): 120
images in ``<workdir>/samples.npz`` (``images``, ``prompts``, ``labels`` = the digit each prompt names) and
``<workdir>/samples_grid.png`` (one row per prompt).

    python train.py --config=configs/digits_text.py --workdir=runs/digits_text
    python benchmarks/conditioning_accuracy.py runs/digits_text   # how often a sample shows the digit it names

Measured on a 2-core CPU shared with other jobs (load average 3-5): 11 min wall for the whole command (stage 1
1:45, stage 2 ~9 min at ~2.8 steps/s, final samples 20 s); 117 of 120 samples (97.5%) read as the digit their
prompt names (``benchmarks/conditioning_accuracy.py``; every digit 0.83-1.00, chance 0.10).
"""

from configs import base, quickstart
from lidiff.data.captions import digit_prompts

PROMPT_DIGITS = tuple(d for d in range(10) for _ in range(3))  # 3 phrasings of each digit


def get_config():
    config = quickstart.get_config()
    config.data = base.data_config("digits_captions", resolution=32)
    d = config.diffusion
    d.conditioning = base.conditioning("text", embed_dim=d.model.context_dim, n_layer=2, heads=4, dim_head=16,
                                       max_length=12, vocab_size=0, build_vocab=True, p_uncond=0.1)
    d.sample.prompts = tuple(digit_prompts(PROMPT_DIGITS))
    d.sample.prompt_labels = PROMPT_DIGITS
    d.sample.num_images = 20
    d.sample.final_samples_per_class = 4  # per prompt: 30 x 4 = 120 samples
    d.sample.guidance_scale = 5.0
    return config
