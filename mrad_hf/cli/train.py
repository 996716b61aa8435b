# SPDX-License-Identifier: Apache-2.0
"""`mrad train`: MRAD-FT / MRAD-CLIP training from the command line, over `mrad_hf.training` (paper Sec. 3.4-3.5).

    mrad train --variant ft --clip openai/clip-vit-large-patch14-336 --aux-dataset visa --aux-root /data/visa \
        --output-dir runs/mrad-ft-visa
    accelerate launch --num_processes 2 -m mrad_hf.cli train ...     # several processes (CPU: add --cpu)
    torchrun --nproc_per_node 2 -m mrad_hf.cli train ...

The reference trains on the auxiliary dataset's test split, which is also the memory (MVTec AD when the target is
VisA, VisA otherwise). The trained model lands in `<output-dir>/final` (AutoModel / pipeline ready); a rerun with the
same output folder resumes from the last complete epoch.
"""

from __future__ import annotations

__all__ = ["register", "cmd_train"]


def cmd_train(args) -> int:
    import os

    if args.device == "cpu":  # Accelerate places each process itself; hiding the GPUs is how to keep it on the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from transformers import CLIPConfig

    from ..data.loaders import load_benchmark
    from ..data.reading import readable_subset
    from ..training.trainer import MRADTrainingArguments, train_mrad
    from .common import RANDOM_BACKBONES, _log, _report_skipped, detector_image_processor, load_detector

    overrides = dict(variant=args.variant)
    if args.patch_dropout_quantile is not None:
        overrides["patch_dropout_quantile"] = args.patch_dropout_quantile
    elif args.aux_dataset == "mvtec":
        overrides["patch_dropout_quantile"] = 0.85  # the reference's value when the auxiliary data is MVTec AD
    if args.retrieval_temperature is not None:
        overrides["retrieval_temperature"] = args.retrieval_temperature
    if args.variant == "clip" and args.clip in RANDOM_BACKBONES:
        text_layers = CLIPConfig(**RANDOM_BACKBONES[args.clip]).text_config.num_hidden_layers
        if text_layers < 9:
            overrides["deep_prompt_depth"] = text_layers
            _log(
                f"The random backbone's text tower has {text_layers} layer(s): deep prompts limited to depth {text_layers}."
            )
    if args.variant == "clip" and args.tokenizer:
        from ..training.tokenization import load_clip_tokenizer

        overrides["tokenizer"] = load_clip_tokenizer(args.tokenizer)
    from accelerate.utils import set_seed

    set_seed(args.seed)  # the heads are initialised from the global RNG whatever the backbone (issue 13 §4)
    detector = load_detector(
        None,
        args.clip,
        image_size=args.image_size,
        seed=args.seed,
        device="cpu",
        bank=args.bank,
        trust_bank=args.trust_bank,
        **overrides,
    )  # Accelerate moves it to each process's device
    dataset = load_benchmark(args.aux_dataset, args.aux_root, categories=args.categories, split=args.split)
    skipped: list[
        dict[str, str]
    ] = []  # unreadable files: named and skipped (or, with --on-error fail, the error) before training
    dataset = readable_subset(
        dataset,
        detector_image_processor(detector).load_pair,
        on_error=getattr(args, "on_error", "skip"),
        failures=skipped,
    )
    for failure in skipped[1:]:
        _log(f"  skipped {failure['path']}: {failure['error']}")
    _report_skipped(skipped, "the lines above (they are not trained on)")
    _log(
        f"Training MRAD-{args.variant.upper()} on {len(dataset)} {args.aux_dataset} images ({args.split} split) from {args.aux_root}"
    )
    training_args = MRADTrainingArguments(
        output_dir=args.output_dir,
        ft_epochs=args.ft_epochs,
        prompt_epochs=args.prompt_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.log_with,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        resume_anyway=args.resume_anyway,
        max_steps_per_epoch=args.max_steps_per_epoch,
        bank_batch_size=args.batch_size,
    )
    result = train_mrad(detector, dataset, training_args, bank_source=args.aux_dataset)
    for record in result.history:
        _log(
            f"epoch {record['epoch']} [{record['stage']}]: mean loss {record['loss']:.4f} over {record['steps']} steps"
        )
    _log(
        f"Trained model: {result.final_model_dir} (AutoModel.from_pretrained / pipeline('anomaly-detection', model=...))"
    )
    return 0


def register(commands) -> None:
    from .common import model_options, non_negative_int, positive_float, positive_int, unit_interval

    train = commands.add_parser(
        "train", help="train MRAD-FT or MRAD-CLIP on a labelled auxiliary dataset (Accelerate)"
    )
    train.add_argument(
        "--variant",
        choices=("ft", "clip"),
        required=True,
        help="ft: projection heads; clip: heads, then prompts and region biases",
    )
    model_options(train, model=False, clip_required=True, runs_model=False, seed_default=111)
    train.add_argument(
        "--device",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: the GPU(s) Accelerate finds, else CPU; cpu: stay on the CPU",
    )
    train.add_argument(
        "--aux-dataset", required=True, help="auxiliary dataset (visa, mvtec, ..., mvtec-layout, folder)"
    )
    train.add_argument("--aux-root", required=True, help="the auxiliary dataset's folder")
    train.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    train.add_argument(
        "--split", default="test", help="dataset split; the reference trains on the auxiliary test split"
    )
    train.add_argument(
        "--output-dir", required=True, help="checkpoints/ and final/ (the trained model) go here; a rerun resumes"
    )
    train.add_argument(
        "--tokenizer",
        help="MRAD-CLIP: CLIP tokenizer folder / Hub id / OpenAI bpe_simple_vocab_16e6.txt.gz (default: the reference ids)",
    )
    train.add_argument("--ft-epochs", type=non_negative_int, default=1, help="epochs of the projection-head stage")
    train.add_argument(
        "--prompt-epochs", type=non_negative_int, default=5, help="MRAD-CLIP: epochs of the prompt stage"
    )
    train.add_argument("--learning-rate", type=positive_float, default=4e-4, help="Adam learning rate")
    train.add_argument(
        "--gradient-accumulation-steps", type=positive_int, default=1, help="optimiser step every k batches"
    )
    train.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="Accelerate autocast (fp16 needs a GPU)",
    )
    train.add_argument("--log-with", help="an Accelerate tracker, e.g. tensorboard (default: none)")
    train.add_argument(
        "--patch-dropout-quantile",
        type=unit_interval,
        help="similarity dropout at pixel level (default: 0.8, 0.85 when --aux-dataset mvtec)",
    )
    train.add_argument(
        "--max-steps-per-epoch", type=positive_int, help="cap the batches per epoch (smoke tests; default: all)"
    )
    train.add_argument("--no-resume", action="store_true", help="start over even if --output-dir holds checkpoints")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="--output-dir holds a different run: delete its checkpoints and start over",
    )
    train.add_argument(
        "--resume-anyway", action="store_true", help="--output-dir holds a different run: resume from it all the same"
    )
    train.set_defaults(handler=cmd_train)
