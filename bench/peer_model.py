"""Write a Hugging Face model folder of a GLM preset's compute shape, for a peer server.

``bench/peer_vllm.sh`` runs this in the peer's own venv (it needs ``tokenizers`` and
``sentencepiece``, which vLLM brings) to give vLLM a ``LlamaForCausalLM`` with the same
arithmetic per token as our preset: the same layers, hidden size, heads (head dim), FFN inner
size (a gated FFN: two input projections and one output projection, like GLM's GeGLU), the
same vocabulary and a tied LM head. It differs from GLM only in costs that are small at this
size: RMSNorm instead of LayerNorm, SiLU instead of GeLU, rotary over the whole head instead of
GLM's two halves. There are no weights: the server is started with ``--load-format dummy``.

The tokenizer is our demo's SentencePiece unigram model (``ice_text.model``) rewritten as a
``tokenizers`` unigram (same pieces and scores, its NFKC normalization map, byte fallback), so
that a prompt text becomes about as many tokens as in our stack (ours adds GLM's [gMASK] and
<sop> ids; the peer sees [MASK] as text). Its vocabulary is padded with unused pieces to the
model's size, so that every id a random model can produce decodes to text. Nothing is
downloaded.

    python bench/peer_model.py --preset glm-small --spm ~/.cache/glm/demo-glm-small/ice_text.model --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import GLMConfig  # noqa: E402  (after the path is set: run as a script)

UNUSED_SCORE = -1e4          # never chosen by the unigram lattice when a real piece matches


def llama_config(config: GLMConfig, dtype: str) -> dict:
    """config.json of a LlamaForCausalLM with ``config``'s compute shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.inner_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_sequence_length,
        "rms_norm_eps": config.layernorm_epsilon,
        "rope_theta": config.rotary_base,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        # written by the transformers of the peer's venv; without it transformers 5 takes a
        # local tokenizer for an old Mistral one and warns about its regex
        "transformers_version": _transformers_version(),
    }


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "5.0.0"


def unigram_tokenizer(spm_path: Path, vocab_size: int):
    """A ``tokenizers.Tokenizer`` with the pieces, scores and normalizer of a SentencePiece
    unigram model, padded to ``vocab_size`` ids."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise SystemExit(f"{spm_path}: not a unigram SentencePiece model")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    if len(vocab) > vocab_size:
        raise SystemExit(f"{spm_path}: {len(vocab)} pieces, more than the model's {vocab_size} ids")
    vocab += [(f"<unused{i}>", UNUSED_SCORE) for i in range(len(vocab), vocab_size)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id,
                                         byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    charsmap = proto.normalizer_spec.precompiled_charsmap
    tokenizer.normalizer = normalizers.Sequence(([normalizers.Precompiled(charsmap)] if charsmap else []) + steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def write_folder(out: Path, preset: str, spm_path: Path, dtype: str) -> None:
    config = GLMConfig.from_name(preset)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(llama_config(config, dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    unigram_tokenizer(spm_path, config.vocab_size).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "model_max_length": config.max_sequence_length,
        "add_bos_token": False, "add_eos_token": False}, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="glm-small", help="a GLM preset of model/config.py")
    p.add_argument("--spm", type=Path, required=True, help="the SentencePiece model (ice_text.model)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument("--dtype", default="float32", help="config.json's torch_dtype")
    p.add_argument("--check", nargs="*", default=None, metavar="TEXT",
                   help="print the token counts of these texts under both tokenizers")
    args = p.parse_args()
    write_folder(args.out, args.preset, args.spm, args.dtype)
    if args.check is not None:
        import sentencepiece as spm
        from tokenizers import Tokenizer

        ours = spm.SentencePieceProcessor(model_file=str(args.spm))
        theirs = Tokenizer.from_file(str(args.out / "tokenizer.json"))
        for text in args.check:
            print(f"{len(ours.encode(text))}\t{len(theirs.encode(text).ids)}\t{text[:40]!r}")
    print(f"peer model: {args.out} ({args.preset}, LlamaForCausalLM, {args.dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
