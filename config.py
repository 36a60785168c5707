"""A run's settings, each declared once: the dataclass field holds its default and the help text
of its flag (settings.py), and train.py builds its command line from them.

    TrainConfig        the run: data, training, the priors' schedule, sampling, the evaluation
    STEPS, BATCH, ...  the defaults that depend on the data (images or speech) or on --adversarial
    saved_configs(run) a run folder's config.json read back, each config checked
    prior_configs(...) one prior.PriorConfig per level (VQ-VAE-2: the top prior and the bottom one)
    sampling_rule(...) temperature, top-k, top-p and guidance -> prior.sample's keywords

The model's settings are vqvae.Config's, the prior's prior.PriorConfig's, the codec's
audio.CodecConfig's; `python train.py --help` lists them all.
"""
from dataclasses import dataclass, fields

import audio
import prior as P
import vqvae
from datasets import AUDIO, MIRROR_INVARIANT
from runs import UserError, read_json
from settings import SettingError, check, check_value, flag_message, from_dict, setting

STAGES, DEVICES = ("vqvae", "prior", "all"), ("auto", "cpu", "gpu")
GUIDANCE = {"images": 1.5, "audio": 2.5}  # guidance of a prior trained with label dropout (docs/prior.md, audio.md)
DISC_BETAS = (0.5, 0.9)   # the discriminator's Adam: VQGAN's (for both its networks), the usual beta1 of GANs
STEPS = {"images": 3000, "adversarial": 6000,  # training steps of the VQ-VAE (docs/decoder.md) ...
         "audio": 2400}                          # ... and of the audio codec (docs/audio.md)
BATCH = {"images": 32, "audio": 16}     # a step's images, or clips of --crop-samples
LR = {"images": 1e-3, "audio": 6e-3}    # Adam's peak learning rate ... (docs/audio.md: the codec's, measured)
LR_WARMUP = {"images": 0, "audio": 100}  # ... reached after a linear warm-up of these steps ...
LR_FLOOR = {"images": 1.0, "audio": 0.1}  # ... then decayed linearly to this fraction of it at --steps (1: constant)
JUDGE_STEPS = {"images": 1500, "audio": 2000}  # the judge's training steps (each of speech's two; docs/audio.md)
BETAS = {"plain": (0.9, 0.999), "adversarial": (0.5, 0.9)}  # the VQ-VAE's Adam: Kingma & Ba's; VQGAN's
PRIOR_STEPS = {"images": 3000, "audio": 3000}  # the prior's training steps (docs/first_run.md, docs/audio.md) ...
PRIOR_WARMUP = {"audio": 600}                   # ... its warm-up: speech's as measured; images' a tenth of the steps
PRIOR_DILATION = {"images": 1, "audio": 2}      # ... its layer l's rows g^l apart: speech's frames (docs/audio.md)
PRIOR_SPEAKER_CHANNELS = 16                     # speech's prior is told the speaker: an embedding this wide
VQVAE2_PRIORS = ({"layers": 8, "attention_every": 4},    # two levels: the top prior, attention after every 4th ...
                 {"layers": 8, "attention_every": 0})    # ... and the bottom prior, given the top codes (docs/vqvae2.md)


@dataclass
class TrainConfig:
    """The run's settings. resumable: may be given again with --resume (the step counts upwards only)."""
    # the run
    data: str = setting("shapes", "shapes (32 x 32 scenes), shapes64 (64 x 64), mnist, fashion-mnist, cifar10, "
                                  "PATH.npy|PATH.npz (uint8 images; an .npz with train, test and optionally "
                                  "train_labels, test_labels), or fsdd (spoken digits: the audio codec)")
    data_dir: str = setting("data", "where dataset files are found or downloaded to")
    stage: str = setting("all", "vqvae, prior (needs --resume) or all: the VQ-VAE, then the prior over its codes",
                         choices=STAGES, resumable=True)
    seed: int = setting(0, "seed of the data order, the initialisation and the samples", low=0)
    device: str = setting("auto", "cpu, gpu (needs CuPy) or auto", choices=DEVICES, resumable=True)
    log_every: int = setting(50, "steps between progress lines", low=1, resumable=True)
    eval_every: int = setting(500, "steps between held-out evaluations, pictures and checkpoints", low=1,
                              resumable=True)
    # the VQ-VAE's training
    steps: int = setting(None, f"VQ-VAE training steps (default {STEPS['images']}, with --adversarial "
                               f"{STEPS['adversarial']}; the audio codec's: {STEPS['audio']})", low=1, resumable=True)
    batch_size: int = setting(None, f"images per VQ-VAE step (default {BATCH['images']}), or the codec's clips "
                                    f"(default {BATCH['audio']})", low=1)
    crop_samples: int = setting(2048, "speech: samples of each training clip, cut at a random place", low=1)
    prior_stages: int = setting(1, "speech: the prior models the codes of the codec's first n stages, a frame's n "
                                   "codes side by side, coarse to fine", low=1)
    prior_frames: int = setting(192, "speech: the code frames of each clip the prior models, silence after a shorter "
                                     "clip (192: 0.77 s, longer than 97 percent of the clips)", low=1)
    lr: float = setting(None, f"the VQ-VAE's peak Adam learning rate (default {LR['images']}; the codec's "
                              f"{LR['audio']}) ...", above=0)
    lr_warmup: int = setting(None, f"... reached after a linear warm-up over this many steps (default "
                                   f"{LR_WARMUP['images']}; the codec's {LR_WARMUP['audio']}) ...", low=0, absent=0)
    lr_floor: float = setting(None, f"... then decayed linearly to this fraction of it at --steps (default "
                                    f"{LR_FLOOR['images']:g}: constant; the codec's {LR_FLOOR['audio']:g})", low=0,
                              high=1, absent=1.0)
    adam_beta1: float = setting(None, f"the VQ-VAE's Adam beta1 (default {BETAS['plain'][0]}; with --adversarial "
                                      f"VQGAN's {BETAS['adversarial'][0]}) ...", low=0, below=1)
    adam_beta2: float = setting(None, f"... and beta2 ({BETAS['plain'][1]}; VQGAN's {BETAS['adversarial'][1]})",
                                low=0, below=1)
    # VQGAN's losses (vqgan.py, docs/adversarial.md, docs/decoder.md)
    l1_weight: float = setting(0.0, "a: weight of an L1 term beside the squared error", low=0)
    perceptual_weight: float = setting(0.0, "b: weight of a perceptual term, in the features of a network trained on "
                                            "the training images to tell their rotation (not the judge)", low=0)
    perceptual_steps: int = setting(1500, "training steps of that network", low=1)
    adversarial: bool = setting(False, "train the VQ-VAE against a patch discriminator as well (VQGAN), with VQGAN's "
                                       "Adam betas and twice the steps by default: the sharp decoder (docs/decoder.md)")
    disc_start: int = setting(500, "the VQ-VAE step at which the discriminator starts, trained and used", low=0)
    disc_weight: float = setting(0.8, "w: the adversarial term's weight, times the adaptive lambda (VQGAN's), at most",
                                 low=0)
    disc_target: float = setting(0.6, "L_D*: w is lowered while the discriminator's hinge loss is above L_D* (nearer "
                                      "chance), let back up to w below it (0: w held, VQGAN's; docs/decoder.md)",
                                 low=0, below=1, absent=0.0)
    disc_layers: int = setting(2, "stride-2 convolutions of the discriminator", low=1)
    disc_width: int = setting(16, "channels of its first convolution (then twice as many a layer, at most 8x)", low=1)
    disc_lr: float = setting(1e-3, "the discriminator's Adam learning rate", above=0)
    # the priors' training (docs/prior.md)
    prior_steps: int = setting(None, f"prior training steps (default {PRIOR_STEPS['images']}, the first run's; 6000: "
                                     f"the longer one, docs/first_run.md; two levels: the top prior's; speech: "
                                     f"{PRIOR_STEPS['audio']})", low=1, resumable=True)
    prior_batch_size: int = setting(8, "code grids per prior step", low=1)
    prior_lr: float = setting(2e-3, "the prior's peak Adam learning rate, reached after ...", above=0)
    prior_warmup: int = setting(None, "... a linear warm-up over this many steps (default: a tenth of --prior-steps; "
                                      f"speech's {PRIOR_WARMUP['audio']}), then decayed linearly ...", low=0, absent=600)
    prior_decay_steps: int = setting(0, "... to a tenth of it at this step (0: at --prior-steps)", low=0)
    bottom_prior_factor: float = setting(0.5, "two levels: the bottom prior trains this share of --prior-steps, its "
                                              "warm-up and decay alike", above=0, only=("levels", (2,)), resumable=True)
    prior_labels: bool = setting(True, "condition the prior on the class labels, where the data has them")
    prior_flip: bool = setting(None, "also train the prior on the codes of horizontally mirrored training images "
                                     f"(default: on for {', '.join(MIRROR_INVARIANT)}, whose classes a mirror keeps)")
    # the samples drawn at the end (and by `sample` and `evaluate`)
    temperature: float = setting(1.0, f"below 1: safer samples; 0: the most likely code (else at least "
                                      f"{P.TEMPERATURE_MIN})", low=0, resumable=True)
    top_k: int = setting(0, "sample from the k most likely codes only (0: all)", low=0, resumable=True)
    top_p: float = setting(1.0, "sample from the fewest most likely codes whose probability reaches p (nucleus; "
                                "1: all)", above=0, high=1, resumable=True)
    guidance: float = setting(None, "classifier-free guidance s of a prior trained with label dropout (1: none; "
                                    f"default: {GUIDANCE['images']} for such a prior, speech's {GUIDANCE['audio']:g}, "
                                    "else 1)", low=0, high=P.GUIDANCE_MAX, resumable=True)
    # the evaluation at the end (evaluation.py, docs/evaluation.md)
    evaluate: bool = setting(True, "measure the samples and reconstructions with a judge network", resumable=True)
    judge_steps: int = setting(None, f"training steps of the evaluation's judge (default {JUDGE_STEPS['images']}; "
                                     f"each of speech's two: {JUDGE_STEPS['audio']})", low=1, resumable=True)
    two_sample_steps: int = setting(600, "training steps of each two-sample test's classifier (0: no test)", low=0,
                                    resumable=True)
    eval_images: int = setting(1000, "held-out images measured, and as many samples", low=2, resumable=True)

    def __post_init__(self):
        kind = "audio" if self.data in AUDIO else "images"
        self.steps = STEPS["adversarial" if self.adversarial and kind == "images" else kind] if self.steps is None \
            else self.steps
        betas = BETAS["adversarial" if self.adversarial else "plain"]
        self.adam_beta1 = betas[0] if self.adam_beta1 is None else self.adam_beta1
        self.adam_beta2 = betas[1] if self.adam_beta2 is None else self.adam_beta2
        self.batch_size = BATCH[kind] if self.batch_size is None else self.batch_size
        self.lr = LR[kind] if self.lr is None else self.lr
        self.lr_warmup = LR_WARMUP[kind] if self.lr_warmup is None else self.lr_warmup
        self.lr_floor = LR_FLOOR[kind] if self.lr_floor is None else self.lr_floor
        self.judge_steps = JUDGE_STEPS[kind] if self.judge_steps is None else self.judge_steps
        self.prior_steps = PRIOR_STEPS[kind] if self.prior_steps is None else self.prior_steps
        if self.prior_warmup is None:
            self.prior_warmup = PRIOR_WARMUP.get(kind, self.prior_steps // 10)
        if self.prior_flip is None:
            self.prior_flip = self.data in MIRROR_INVARIANT
        check(self)

    @classmethod
    def from_dict(cls, d):
        """From a run's config.json, older ones too: --top-prior-factor M (the top prior trained M
        times --prior-steps) is now --prior-steps M times as large and --bottom-prior-factor 1/M."""
        d = dict(d)
        M = d.pop("top_prior_factor", None)
        if M is not None and "bottom_prior_factor" not in d:
            d.setdefault("prior_steps", 6000)                         # the defaults of that time
            d.setdefault("prior_warmup", 600)
            for key in ("prior_steps", "prior_warmup", "prior_decay_steps"):
                d[key] = d.get(key, 0) * M
            d["bottom_prior_factor"] = 1 / M
        return from_dict(cls, d)




def saved_configs(run):
    """(TrainConfig, vqvae.Config or audio.CodecConfig, PriorConfigs) of a run folder's config.json, each checked."""
    path = run / "config.json"
    if not run.is_dir():
        raise UserError(f"{run}: not a run folder" + (" (no such folder)" if not run.exists() else ""))
    try:
        saved = read_json(path, "run config")
    except FileNotFoundError:
        raise UserError(f"{run}: not a run folder (no config.json)")
    try:
        speech = isinstance(saved.get("codec"), dict)                  # a run of the audio codec
        model, priors = ("codec", saved.get("priors", [])) if speech else ("model", saved.get("priors"))
        if not (isinstance(saved.get("train"), dict) and isinstance(saved.get(model), dict)
                and isinstance(priors, list) and all(isinstance(p, dict) for p in priors)):
            raise ValueError("expected objects 'train' and 'model' (or 'codec') and a list of objects 'priors'")
        cfg = TrainConfig.from_dict(saved["train"])
        model_cfg = (audio.CodecConfig if speech else vqvae.Config).from_dict(saved[model])
        if len(priors) != model_cfg.levels and not (speech and not priors):  # a speech run from before its prior
            raise ValueError(f"{len(priors)} prior configs for a model of {model_cfg.levels} level(s)")
        priors = [P.PriorConfig.from_dict(p) for p in priors]
        if [p.codebook_size for p in priors] != model_cfg.level_num_codes:
            raise ValueError(f"the priors' codebook sizes {[p.codebook_size for p in priors]} differ from the "
                             f"model's codes per level {model_cfg.level_num_codes}")
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: unreadable run config ({e})")
    return cfg, model_cfg, priors


def prior_configs(settings, model_cfg, num_classes, seed):
    """One PriorConfig per level, coarsest first, from the --prior-* flags given (`settings`) and
    PriorConfig's defaults. Two levels (VQ-VAE-2): VQVAE2_PRIORS' layers, attention in the top
    prior only (the flag sets the top one's), and a bottom prior conditioned on the top codes,
    each of which covers 2 x 2 bottom positions, through residual blocks (its conditioning stack).
    Speech whose codec takes the speaker: a prior told the speaker too, an embedding of it added to
    every layer, so that its codes are those of the voice they will be decoded in (docs/audio.md)."""
    if settings.get("label_dropout", 0) > 0 and not num_classes:
        raise UserError(f"--prior-label-dropout {settings['label_dropout']} drops the class of a class-conditional "
                        f"prior; this prior has no classes (--no-prior-labels, or data without labels)")
    K = model_cfg.level_num_codes                                      # coarsest first
    kind = "audio" if isinstance(model_cfg, audio.CodecConfig) else "images"
    settings = {"dilation": PRIOR_DILATION[kind], **settings}         # the flag's, else the data's
    if kind == "audio" and model_cfg.speakers:   # told the voice its codes will be decoded in (speech.speaker_grids)
        settings = {"cond_blocks": 0, **settings, "cond_codebook_size": len(model_cfg.speakers),
                    "cond_channels": PRIOR_SPEAKER_CHANNELS}
    base = dict(num_classes=num_classes, dtype=model_cfg.dtype)
    try:
        if model_cfg.levels == 1:
            return [P.PriorConfig(**base, **settings, codebook_size=K[0], seed=seed)]
        top = {**VQVAE2_PRIORS[0], **{k: v for k, v in settings.items() if k != "cond_blocks"}}
        bottom = {**VQVAE2_PRIORS[1], **{k: v for k, v in settings.items() if k != "attention_every"}}
        return [P.PriorConfig(**base, **top, codebook_size=K[0], seed=seed),
                P.PriorConfig(**base, **bottom, codebook_size=K[1], seed=seed + 1, cond_codebook_size=K[0],
                              cond_channels=bottom.get("channels", P.PriorConfig.channels), cond_upsample=2)]
    except SettingError as e:                                          # named as the flag the user typed
        raise UserError(flag_message(e, "prior_"))


def sampling_rule(settings, prior_cfgs, kind="images"):
    """temperature, top_k, top_p and guidance of a TrainConfig or of parsed flags, checked against
    their declarations and the PriorConfigs of the priors that will sample -> prior.sample's
    keywords. Guidance not given: GUIDANCE of the data's `kind` when every prior was trained with
    label dropout (it knows the grids without a class), else 1 (none)."""
    rule = {}
    for f in fields(TrainConfig):
        if f.name in ("temperature", "top_k", "top_p", "guidance"):
            v = getattr(settings, f.name)
            try:
                rule[f.name] = f.default if v is None else check_value(f, v)
            except SettingError as e:
                raise UserError(flag_message(e))
    if 0 < rule["temperature"] < P.TEMPERATURE_MIN:
        raise UserError(f"--temperature {rule['temperature']:g} overflows the logits: give 0 (the most likely code) "
                        f"or at least {P.TEMPERATURE_MIN}")
    guided = bool(prior_cfgs) and all(c.label_dropout > 0 for c in prior_cfgs)
    if rule["guidance"] is None:
        rule["guidance"] = GUIDANCE[kind] if guided else 1.0
    elif rule["guidance"] != 1 and prior_cfgs and not guided:
        raise UserError(f"--guidance {rule['guidance']} needs a class-conditional prior trained with "
                        f"--prior-label-dropout > 0; this run's prior{'s were' if len(prior_cfgs) > 1 else ' was'} not")
    return rule
