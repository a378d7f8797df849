"""Every config field, with its default. Experiment configs import this and override a few fields.

    python -m ddpm_jax.main --config configs/default.py --workdir runs/default

trains DDPM's CIFAR-10-sized network on the faces that ship with the install; see the other files
in configs/ for real experiments. Override any field on the command line with
`--config.GROUP.KEY=VALUE`; an unknown key is an error.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # one key for init, data order, t/noise/dropout draws and sampling

    config.data = data = ml_collections.ConfigDict()
    data.source = "embedded"  # 'embedded' (ships with the install), 'folder' or 'tfds'
    data.name = "lfw_faces"  # tfds builder name, or the embedded dataset's name
    data.path = ""  # folder source: directory searched recursively for jpg/jpeg/png/webp/bmp
    data.split = "train"  # tfds split to train on
    data.eval_split = ""  # tfds split for the validation loss; '' holds out training images
    data.data_dir = ""  # tfds data_dir ('' = tfds default; use it for manually downloaded data)
    # Training resolution: 32 (square) or (height, width), e.g. --config.data.image_size="(48,64)"
    data.image_size = config_dict.FieldReference(32, field_type=object)
    data.channels = 3  # 3: RGB; 1: greyscale (images are converted; the model draws grey)
    data.resize = "center_crop"  # 'center_crop' (keep aspect, crop the middle) or 'stretch'
    data.random_flip = True  # random horizontal flips, drawn on device from the step's key
    data.cache = True  # keep decoded, resized uint8 images in memory when they fit...
    data.cache_max_gb = 4.0  # ...under this size
    data.num_eval_examples = 16  # held-out images for the validation loss (folders: at most)
    data.folder_eval_fraction = 0.05  # folder source: share held out, rounded down (24 -> 1)
    data.prefetch = 2  # global batches kept ready on device
    data.num_workers = 8  # image-decoding threads
    data.labels = ""  # folder: 'subdirs' = one class per top-level sub-directory; '' = no labels
    data.label_key = "label"  # tfds: the feature holding the class (model.num_classes > 0)
    data.class_names = ()  # filled from the data when training, saved with the checkpoint

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128  # base channel count
    model.ch_mult = (1, 2, 2, 2)  # channel multiplier per resolution level
    model.num_res_blocks = 2  # residual blocks per level
    model.attn_resolutions = (16,)  # feature-map sizes that get self-attention
    model.dropout = 0.1
    model.norm_groups = 0  # GroupNorm groups; 0: min(32, ch // 4), DDPM's 32 at ch >= 128
    model.dtype = "float32"  # compute dtype: 'bfloat16' on GPU/TPU (params stay float32)
    model.attention_impl = "auto"  # 'auto' (cuDNN's fused kernel on GPU if it fits), 'xla', 'cudnn'
    model.remat = False  # recompute res blocks in the backward pass to save memory
    model.num_classes = 0  # > 0: class-conditional on the data's labels; 0: unconditional
    model.label_dropout = 0.1  # class-conditional: labels dropped to the null class (for guidance)

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.num_timesteps = 1000  # T
    diffusion.beta_schedule = "linear"  # 'linear' (DDPM: 1e-4 to 0.02) or 'cosine'
    diffusion.prediction = "eps"  # network target: 'eps' (DDPM), 'x0' or 'v'
    diffusion.min_snr_gamma = 0.0  # >0: min-SNR-gamma loss weighting (5.0 is usual); 0: off

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-4  # Adam, DDPM's CIFAR-10 value
    optim.warmup_steps = 5000  # linear warm-up from 0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.grad_clip = 1.0  # global-norm clipping

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 64  # global, split over all devices
    training.num_train_steps = 800_000
    training.steps_per_call = 1  # steps fused in one jitted lax.scan (GPU/TPU; keep 1 on CPU)
    training.grad_accum_steps = 1  # micro-batches per step: batch_size/N at a time, same update
    training.ema_decay = 0.9999
    training.ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step)) early on
    training.log_every_steps = 100
    training.eval_every_steps = 1000  # validation loss on held-out images, fixed t and noise
    training.checkpoint_every_steps = 5000
    training.keep_checkpoints = 3  # most recent checkpoints kept on disk
    training.sample_every_steps = 10_000  # sample grid from the EMA params
    training.num_grid_samples = 64  # images in that grid
    training.max_nonfinite_steps = 10  # stop after this many non-finite steps in a row

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.sampler = "ddpm"  # 'ddpm' (ancestral), 'ddim', 'dpm_solver++', 'heun' (docs/samplers)
    sampling.num_steps = 0  # network evaluations per image; 0: all T (ddpm respaces when < T)
    sampling.spacing = "auto"  # timestep grid: uniform/logsnr/quadratic/karras; auto: paper's
    sampling.eta = 0.0  # DDIM noise: 0 deterministic, 1 ancestral-like
    sampling.variance = "fixed_large"  # ancestral variance: 'fixed_large' (beta) or 'fixed_small'
    sampling.clip_x0 = True  # clip predicted x0 to [-1, 1] at every step
    sampling.num_samples = 64  # images written by --mode=sample
    sampling.per_device_batch = 64  # images per device per sampling call
    sampling.checkpoint_step = -1  # checkpoint to sample from; -1 = latest
    sampling.label = -1  # class-conditional: the class drawn; -1 = all classes in turn
    sampling.guidance_scale = 1.0  # classifier-free guidance w: 0 uncond, 1 cond, > 1 guided

    # --mode=inpaint, interpolate and img2img (docs/editing.md); the sampler is config.sampling's.
    config.edit = edit = ml_collections.ConfigDict()
    edit.images = ""  # an image file or a folder of them (sorted by name): the images to edit
    edit.masks = ""  # inpaint: one mask for all, or a folder of one per image (same file name)
    edit.jump_length = 1  # inpaint: RePaint resampling goes back this many steps (RePaint: 10)...
    edit.jump_n_sample = 1  # ...and samples each stretch this many times (RePaint: 10; 1: off)
    edit.strength = 0.5  # img2img: the input noised to strength x T; 0: unchanged, 1: pure noise
    edit.num_frames = 8  # interpolate: frames per row, both ends included
    edit.seeds = (0, 1)  # interpolate without edit.images: seed pairs (a, b, c, d: a-b, c-d)

    config.eval = ev = ml_collections.ConfigDict()
    ev.num_samples = 50_000  # EMA samples for --mode=eval (FID/KID); papers use 50k
    ev.batch_size = 256  # Inception batch (a multiple of the device count)
    ev.inception_weights = ""  # .npz or .pth FID Inception weights; '' = cache, else download
    ev.cache_dir = ""  # weights and reference statistics; '' = $DDPM_JAX_CACHE or ~/.cache/ddpm_jax
    ev.reference_split = "train"  # reference statistics from this split, unaugmented
    ev.reference_num_examples = 0  # 0 = the whole split
    ev.kid_subsets = 100
    ev.kid_subset_size = 1000
    ev.max_kid_features = 10_000  # reference/sample features kept for KID
    ev.training_fid_every_steps = 0  # FID during training every N steps (0 = off); not papers'
    ev.training_fid_num_samples = 1000  # samples for that FID (fewer: biased upwards)
    ev.keep_best = False  # also keep the checkpoint with the best in-loop FID
    ev.is_splits = 10  # Inception Score splits of eval.num_samples (torch-fidelity's 10)
    ev.nll_num_examples = 0  # NLL (bits/dim) on this many held-out images; 0 = off, -1 = all
    ev.nll_split = "test"  # tfds split for the NLL (folder/embedded: data.num_eval_examples)
    return config
