"""The shared base of every config: Split CIFAR-100 L2P with ViT-B/16.

Each config file imports `get_base_config()` and overrides the fields that differ, so a
difference between two methods or benchmarks is visible in a few lines. Every field below is
read by the code; the comment above each says what it does. The code reads `config.field`
with no default of its own: this file is the one source of defaults.

The base config is locked: a config file (or a test) that sets a field this file does not
define, e.g. a misspelt `config.leraning_rate`, raises instead of adding a field no code reads.

Every config file's `get_config(arg=None)` takes one of `ARGS` (on the command line, after a
colon: `--my_config configs/digits_l2p.py:tiny`):
  tiny: the same run shrunk for tests and quick checks (`set_tiny`).
"""

import ml_collections
from ml_collections import config_dict


# The values `get_config(arg)` of every config file accepts, besides None (the full run).
ARGS = ("tiny",)


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the base config (L2P on Split CIFAR-100, 8 devices x 16 images), locked."""
  config = ml_collections.ConfigDict()

  # --- Model -------------------------------------------------------------------
  # ViT variant, one of models.vit.VARIANTS (ViT-Ti_16 ... ViT-H_14, ViT-test), or a ResNet of
  # models.resnet.VARIANTS (resnet18, resnet18_he, resnet50, resnet18_cifar, resnet-test) for the
  # fine-tuning and rehearsal baselines (method "none", trained from scratch).
  config.model_name = "ViT-B_16"
  # Pretrained backbone: the ViT release `.npz` or timm `.safetensors`. None: random init.
  config.init_checkpoint = config_dict.placeholder(str)
  # Head input: "token", "prompt", "gap" or "token+prompt".
  config.vit_classifier = "prompt"
  # Prepend a learnt class token to the patch tokens (the "token" classifiers need it).
  config.use_cls_token = True
  # L2-normalise the pre-logits before the head.
  config.norm_pre_logits = False
  # Logits are divided by this.
  config.temperature = 1.0
  # Train-time dropout; None: the variant's own rate, as the original (0.1 for ViT-L_16 and
  # ViT-H_14, 0 for the others).
  config.dropout_rate = config_dict.placeholder(float)
  # Compute dtype of activations and matmuls ("float32" or "bfloat16"); parameters,
  # optimizer state and loss stay float32.
  config.dtype = "float32"
  # ResNet: keep the BatchNorm running statistics as initialised (training still normalises
  # each device's batch with its own statistics); else they follow the mean over devices.
  config.freeze_bn_stats = False
  # "xla": explicit softmax attention; "fused": jax.nn.dot_product_attention with the kernel
  # JAX picks; "cudnn": the same with cuDNN flash attention (NVIDIA GPUs, bfloat16 only).
  config.attention_impl = "xla"

  # --- Prompt method --------------------------------------------------------------
  # One of models.methods.METHODS: "l2p" (keyed prompt pool), "dualprompt" (G-Prompt plus
  # E-Prompt pool), "coda" (CODA-Prompt components) or "none" (a plain ViT: the baselines).
  config.method = "l2p"

  # --- G-Prompt (DualPrompt) -------------------------------------------------------
  # Add the G-Prompt, one prompt shared by every task (method "dualprompt"; "l2p" needs False).
  config.use_g_prompt = False
  # G-Prompt tokens per block (with prefix-tuning: this many keys and as many values).
  config.g_prompt_length = 5
  # Blocks that receive the G-Prompt.
  config.g_prompt_layer_idx = (0, 1)
  # G-Prompt as prefixes of the attention keys and values (True) or as input tokens (False).
  config.use_prefix_tune_for_g_prompt = True

  # --- E-Prompt / L2P prompt pool ----------------------------------------------------
  # Add the E-Prompts drawn from the keyed pool ("l2p" needs True; "dualprompt" may drop them).
  config.use_e_prompt = True
  # L2P prepends its prompts at the input of block 0 (prompt-tuning).
  config.e_prompt_layer_idx = (0,)
  # E-Prompts as prefixes of the attention keys and values (True) or as input tokens (False).
  config.use_prefix_tune_for_e_prompt = False
  # The E-Prompts come from the keyed pool below ("l2p" and "dualprompt" need True).
  config.prompt_pool = True
  config.prompt_pool_param = ml_collections.ConfigDict()
  # Prompts in the pool. The original's cifar100_l2p.py values; the L2P paper's text gives
  # length 5, top_k 5 (README, "Differences from the original configs").
  config.prompt_pool_param.pool_size = 10
  # Tokens per prompt and block (with prefix-tuning: this many keys and as many values).
  config.prompt_pool_param.length = 10
  # Prompts chosen per image (their tokens are concatenated).
  config.prompt_pool_param.top_k = 4
  # Prompt initialiser: "uniform" ([0, 0.01)) or "normal".
  config.prompt_pool_param.initializer = "uniform"
  # Key initialiser: "uniform" or "normal", as `initializer`.
  config.prompt_pool_param.prompt_key_init = "uniform"
  # Learnable keys; False uses the mean of each prompt's tokens as its key.
  config.prompt_pool_param.prompt_key = True
  # Train task t on prompt ids [t * top_k, (t + 1) * top_k) instead of key matching.
  config.prompt_pool_param.use_prompt_mask = False
  # Apply that mask in the first epoch of each task only.
  config.prompt_pool_param.mask_first_epoch = False
  # At the start of task t > 0, copy the prompts of task t - 1's slots into t's.
  config.prompt_pool_param.shared_prompt_pool = False
  # The same for the keys.
  config.prompt_pool_param.shared_prompt_key = False
  # Majority vote of prompt ids over each group of `vote_group_size` images.
  config.prompt_pool_param.batchwise_prompt = True
  # -1: a device's whole batch, as the original under pmap (per_device_batch_size images, twice
  # that when replay batches join them). Set it to 16 to reproduce an 8 x 16 run on one device
  # with per_device_batch_size=128.
  config.prompt_pool_param.vote_group_size = -1
  # Also vote at test time (the original's setting; False selects prompts per image).
  config.prompt_pool_param.batchwise_prompt_at_test = True
  # Query for key matching: "cls" (query ViT), "mean", "max" or "mean_max" of the patch embeddings.
  config.prompt_pool_param.embedding_key = "cls"

  # --- CODA-Prompt ------------------------------------------------------------------------
  config.coda_prompt_param = ml_collections.ConfigDict()
  # Components over all tasks; each task adds pool_size / num_tasks of them.
  config.coda_prompt_param.pool_size = 100
  # Prefix tokens per block, split in half: the first half extends the attention keys, the
  # second the values.
  config.coda_prompt_param.length = 8
  # Blocks that receive the prefixes.
  config.coda_prompt_param.layer_idx = (0, 1, 2, 3, 4)
  # Weight of the orthogonality penalty on keys, attention vectors and prompts (the official
  # scripts' 0.0 turns it off).
  config.coda_prompt_param.ortho_mu = 0.0

  # Parameters whose path contains one of these substrings are not trained.
  config.freeze_part = ("encoder", "embedding", "cls")
  # Surrogate loss pulling the chosen keys towards the queries.
  config.pull_constraint = True
  # Its weight: the loss gains -coeff x (cosine of query and chosen keys, summed over the
  # top_k keys, averaged over the images).
  config.pull_constraint_coeff = 1.0
  # Write a histogram of chosen prompt ids at each evaluation.
  config.prompt_histogram = True

  # --- Data ----------------------------------------------------------------------------
  # Benchmark: "cifar100", "5datasets", "core50", "imagenet_r" or "digits".
  config.dataset = "cifar100"
  # TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
  config.data_dir = config_dict.placeholder(str)
  # Task-free stream of episodes with Gaussian class bumps instead of disjoint tasks
  # (class-split benchmarks only; see configs/cifar100_gaussian_l2p.py).
  config.gaussian_schedule = False
  # Side of the square network input, in pixels.
  config.input_size = 224
  # Side images are first resized to; the random resized crop (train) or the central crop
  # (test) then takes an input_size image from it. Benchmarks without augmentation (digits)
  # resize straight to input_size.
  config.resize_size = 256
  # Pixels in [0, 1] (True) or [-1, 1].
  config.norm_01 = True
  # Build the network inputs on the accelerators, inside the steps: the host decodes each image
  # once and sends it as stored (uint8, e.g. 32x32 for CIFAR) with its crop window and flip; the
  # steps resize, crop and flip it. Same pixels as on the host up to float rounding. Applies when
  # every image of the benchmark has one stored shape (all but imagenet_r); else the host does it.
  config.preprocess_on_device = True
  # Test images through the training augmentation (random resized crop and flip, fixed per
  # seed and image, so every evaluation sees the same ones) instead of the central crop.
  # None: the original's choice per benchmark, True for core50 only; True / False force it.
  config.eval_with_train_augment = config_dict.placeholder(bool)

  # --- Extra training augmentation (libml/augment.py), all off by default ----------------
  config.augment = ml_collections.ConfigDict()
  # RandAugment: operations applied in turn to each training image, each drawn uniformly from
  # `ops` (0: RandAugment off; the original's default is 2).
  config.augment.num_layers = 0
  # Their level in [0, 1] (1: rotate 30 degrees, shear 0.3, ...; Posterize and Solarize get
  # weaker as it grows, as in the original); None: a level drawn per operation from
  # {0, 1/num_levels, ..., 1}, the original's default.
  config.augment.magnitude = config_dict.placeholder(float)
  # Levels of that draw.
  config.augment.num_levels = 10
  # Probability that each drawn operation is applied.
  config.augment.prob_to_apply = 1.0
  # The operations drawn from (libml.augment.OPS: the original's 16).
  config.augment.ops = ("AutoContrast", "Equalize", "Rotate", "Posterize", "Solarize", "Color",
                        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                        "TranslateY", "Identity", "SolarizeAdd", "Invert")
  # Cutout after RandAugment: a grey box of half the image's sides at a random centre, clipped
  # to the image (the original's RandAugment adds it: set True with num_layers to match).
  config.augment.cutout = False
  # Colour jitter after that: brightness, contrast and saturation by up to 0.8 x this, hue by
  # up to 0.2 x this, in a random order (0: off; at most 1.25; the original's default 0.5).
  config.augment.color_jitter_strength = 0.0
  # Probability of that jitter, when color_jitter_strength > 0.
  config.augment.color_jitter_prob = 0.8
  # Probability of turning the image grey after it, when color_jitter_strength > 0.
  config.augment.grayscale_prob = 0.2
  # With any per-image augmentation on (RandAugment, cutout, colour jitter, random erasing),
  # train and eval pixels in [0, 1] become (x - mean) / std per RGB channel, instead of
  # `norm_01`'s. CIFAR-100's, as the original for cifar100; it uses CIFAR-10's
  # (0.4914, 0.4822, 0.4465) for core50, imagenet_r, cifar10, svhn and the MNISTs.
  config.augment.mean = (0.5071, 0.4867, 0.4408)
  # The std of that normalisation; the original's CIFAR-10 values: (0.2471, 0.2435, 0.2616).
  config.augment.std = (0.2675, 0.2565, 0.2761)
  # Random erasing, on the normalised image: probability per image (0: off).
  config.augment.erase_prob = 0.0
  # Range of the erased box's area, as fractions of the image (drawn uniformly).
  config.augment.erase_area = (0.02, 1 / 3)
  # Range of its height / width (drawn log-uniformly); the box lies wholly inside the image.
  config.augment.erase_aspect = (0.3, 1 / 0.3)
  # Its fill: "pixel" (N(0, 1) noise per pixel, the original's), "rand" (one N(0, 1) colour)
  # or "const" (zeros: the mean colour).
  config.augment.erase_mode = "pixel"
  # Mixup of training batches (0: off; the original's default 0.8): image w x + (1 - w) x'
  # with a random partner x' of the batch, w = 1 - u^(1 / mixup_alpha) / 2, u ~ U(0, 1);
  # the loss weighs the two labels by w and 1 - w.
  config.augment.mixup_alpha = 0.0
  # Cutmix of training batches (0: off; the original's default 1.0): a box of the partner
  # (the batch reversed) of area fraction about u^(1 / cutmix_alpha) / 2 is pasted.
  config.augment.cutmix_alpha = 0.0
  # Probability that a batch is mixed, when mixup or cutmix is on.
  config.augment.mix_prob = 1.0
  # With both on: probability that a batch gets cutmix rather than mixup.
  config.augment.switch_prob = 0.5
  # Host memory (MiB) for decoded eval images kept from one evaluation to the next.
  config.decoded_cache_mb = 1024
  # Host memory (MiB) for a task's decoded training images; a larger task keeps its images
  # encoded and decodes them at every use.
  config.decoded_train_mb = 4096
  # Training records are shuffled with a sliding buffer of this many, as tf.data's shuffle;
  # at least the task's size (or <= 0): a uniform permutation per epoch.
  config.shuffle_buffer_size = 10000
  # Fraction of each task's training set to keep (-1: all).
  config.subsample_rate = -1.0
  # Train the tasks in reverse order.
  config.reverse_task = False

  # --- Continual protocol ------------------------------------------------------------
  config.continual = ml_collections.ConfigDict()
  # Tasks trained in turn (episodes for the Gaussian schedule); at most the benchmark's.
  config.continual.num_tasks = 10
  # Classes of each task on class-split benchmarks (cifar100, imagenet_r, digits); the others
  # fix their own.
  config.continual.num_classes_per_task = 10
  # -1: classes in label order; >= 0: a permutation seeded from this value.
  config.continual.rand_seed = -1
  # -1: `num_epochs` decide; > 0: train this many steps per task (Gaussian schedule: the
  # episode's stream length, see configs/cifar100_gaussian_l2p.py).
  config.continual.num_train_steps_per_task = -1
  # Logits of classes outside the current task are -inf during training.
  config.continual.train_mask = True
  # Evaluate with the task's own classes only (task-incremental accuracy).
  config.continual.eval_task_inc = False

  # --- Rehearsal (see libml/replay.py) ------------------------------------------------
  config.continual.replay = ml_collections.ConfigDict()
  # Examples kept per class of each task, drawn at random from the task's first pass
  # (0: no rehearsal buffer). From task 1 on, every batch is joined by as many replayed ones.
  config.continual.replay.num_samples_per_class = 0
  # Replay batches may draw the current task's kept examples too (else earlier tasks' only).
  config.continual.replay.include_new_task = True
  # With train_mask: the replayed examples' logits keep every class (the task's examples keep
  # the task's classes). Replay with train_mask needs it.
  config.continual.replay_no_mask = False
  # With replay_no_mask: the replayed examples' logits of the current task's classes are -inf (needs
  # replay.include_new_task=False: the replayed examples then all belong to earlier tasks).
  config.continual.replay_reverse_mask = False
  # Replay only in a review session after each task's training (needs a buffer): batches of
  # kept examples alone, from the whole buffer, without the task's logit mask.
  config.continual.review_trick = False
  # Steps of each review session; -1: num_review_epochs passes over one task's kept examples.
  config.continual.num_review_steps = -1
  # Review epochs (steps are rounded down to whole epochs); the session evaluates every
  # num_review_epochs // 5 of them.
  config.continual.num_review_epochs = 5
  # A review session after the last task only.
  config.continual.review_last_only = False

  # --- Optimisation ----------------------------------------------------------------
  # Images per device and step; the global batch is this x the number of devices.
  config.per_device_batch_size = 16
  # "adam", "adamw" or "sgd" (Nesterov momentum).
  config.optim = "adam"
  # Momentum of "sgd".
  config.sgd_momentum = 0.9
  # Scaled by global_batch / 256.
  config.learning_rate = 0.03
  # "constant", "cosine" or "linear" (decay over the task's epochs after the warm-up), or
  # "coda_cosine" (CODA-Prompt's per-epoch quarter cosine; see optim.learning_rate_at).
  config.learning_rate_schedule = "constant"
  # Linear warm-up over this many epochs of each task (must be < num_epochs).
  config.warmup_epochs = 0
  # Floor of the learning rate after the warm-up, scaled like learning_rate.
  config.min_learning_rate = 0.0
  # "adam" and "sgd": 0.5 x weight_decay x (squared weights of rank >= 2, frozen ones too)
  # is added to the loss; "adam" and "adamw" also decay the trained weights in the update.
  config.weight_decay = 0.0
  # Clip the gradients to this global norm (<= 0: no clipping).
  config.grad_clip_max_norm = 1.0
  # "full": clip by the norm of every gradient, frozen backbone included (the original);
  # "trainable": clip the trainable gradients only and skip the frozen weight gradients.
  config.grad_clip_mode = "full"
  # Re-create the optimizer state at the start of every task.
  config.reinit_optimizer = True
  # Epochs per task (unless continual.num_train_steps_per_task > 0).
  config.num_epochs = 5

  # --- Evaluation, logging, checkpoints -----------------------------------------
  # Evaluate only after the last task.
  config.eval_last_only = False
  # Also evaluate every this many epochs within a task (-1: only at the end of a task).
  config.eval_per_epochs = -1
  # Also evaluate every this many steps within a task (-1: never).
  config.eval_every_steps = -1
  # Evaluate at most this many batches per eval set (-1: all).
  config.num_eval_steps = -1
  # Compute the query ViT's features of each eval image once and reuse them.
  config.cache_eval_query_features = True
  # Log the mean training metrics every this many steps of a task.
  config.log_loss_every_steps = 3
  # Checkpoint every this many global steps (and after each task's evaluation).
  config.checkpoint_every_steps = 5000
  # Keep only the latest checkpoint.
  config.save_last_ckpt_only = True

  # Seed of the data (shuffles, subsampling, augmentation, the Gaussian schedule's label
  # sets) and, plus `trial`, of parameter init and dropout.
  config.seed = 42
  # Repetition index: offsets the seed of parameter init and dropout.
  config.trial = 0
  # Config files may change these fields but add none: a misspelt name raises.
  config.lock()
  return config


def set_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a run of seconds on a CPU: the tests' and quick checks' size.

  The tiny random `ViT-test` (no pretrained weights) on 16 x 16 inputs, prompts of 2 tokens,
  2 tasks of 4 steps at 4 images per device, logging and checkpointing every 2 steps (every
  checkpoint kept, so that tests can read them); CODA-Prompt with 8 components, as many
  orthogonal keys as the tiny ViT's width holds. Method, benchmark and protocol stay.
  """
  config.model_name = "ViT-test"
  config.init_checkpoint = None
  config.input_size = 16
  config.resize_size = 16
  config.prompt_pool_param.length = 2
  config.prompt_pool_param.top_k = 2
  config.continual.num_tasks = 2
  config.continual.num_train_steps_per_task = 4
  config.per_device_batch_size = 4
  config.log_loss_every_steps = 2
  config.checkpoint_every_steps = 2
  config.save_last_ckpt_only = False
  config.shuffle_buffer_size = 64
  if config.method == "coda":
    # ViT-test is 32 wide: room for at most 32 orthogonal keys; 4 components per task.
    config.coda_prompt_param.pool_size = 8
  return config


def with_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config file's `get_config(arg)`: None keeps `config`; "tiny": `set_tiny`.

  Raises:
    ValueError: `arg` is not one of ARGS.
  """
  if arg is None:
    return config
  if arg == "tiny":
    return set_tiny(config)
  raise ValueError(f"Unknown config argument {arg!r}; valid: {', '.join(ARGS)} (or none for the full run).")
