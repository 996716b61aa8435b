# SPDX-License-Identifier: Apache-2.0
"""Converters from the official MRAD / OpenAI CLIP release files to mrad-hf artefacts (`mrad convert clip|bank|checkpoint`).

    mrad convert bank --cache-dir ./cache --dataset visa --output banks/visa.safetensors   # same as:
    python -m mrad_hf.conversion.convert_official_bank --cache-dir ./cache --dataset visa --output banks/visa.safetensors
    python -m mrad_hf.conversion.convert_openai_clip ViT-L-14-336px.pt models/clip-vit-large-patch14-336
    python -m mrad_hf.conversion.convert_official_checkpoint checkpoints/test_on_mvtec.pth models/mrad-clip-visa \
        --clip models/clip-vit-large-patch14-336 --bank banks/visa.safetensors

Each script has `--help` and is also an importable function (`convert_official_bank`, `convert_openai_clip`,
`convert_official_checkpoint`). Every file is read with `torch.load(..., weights_only=True)`, or, for OpenAI's
TorchScript archive only, by `conversion.torchscript` (a restricted unpickler; the archive's code never runs);
the bank and checkpoint converters refuse TorchScript archives by name. No code from a file is ever executed, and no
tensor larger than its stored bytes (expanded, overlapping) is accepted (`common.load_torch_file`). Unknown or missing
keys stop the conversion with the list of them; every refusal names the file.
"""
