"""Text completion and an interactive chat loop from a checkpoint, streaming tokens as they come.

    python experiments/generate.py --prompt "The meaning of life is" [--max-new 64] [--temperature 0.8]
    python experiments/generate.py --chat          # ChatGLM-style [Round N] prompts, empty line quits

The prompt is continued after [gMASK] (put [MASK] in it to fill a blank instead). Greedy when
--temperature is 0; otherwise temperature / top-k / top-p sampling with --seed.
"""

import argparse
import sys

from glm_jax.cli import add_checkpoint_args
from glm_jax.tokenizer import GMASK, MASK


def encode_prompt(tok, text: str) -> list[int]:
    """Text with an optional literal [MASK] blank; otherwise continued after [gMASK]."""
    if "[MASK]" in text:
        before, after = text.split("[MASK]", 1)
        return tok.encode(before) + [MASK] + tok.encode(after)
    return tok.encode(text) + [GMASK]


def chat_prompt(history: list[tuple[str, str]], query: str) -> str:
    """ChatGLM's format: [Round i]\\n问：q\\n答：a\\n ... for each past round, then the new one."""
    text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return text + f"[Round {len(history)}]\n问：{query}\n答："


def stream(gen, tok, ids, args, key) -> str:
    """Generate for one prompt, printing text as tokens arrive; return the text."""
    out: list[int] = []
    shown = [""]

    def on_token(step, tokens):
        out.append(int(tokens[0]))
        text = tok.decode([t for t in out if t > 8])
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    result = gen.generate([ids], args.max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          key=key, on_token=on_token)[0]
    print()
    return tok.decode(result)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.prompt and not args.chat:
        ap.error("give --prompt TEXT (repeatable) or --chat")
    import jax

    from glm_jax.generate import Generator
    from glm_jax.tokenizer import GLMTokenizer
    from glm_jax.train import CheckpointError, load_checkpoint

    try:
        config, params, step = load_checkpoint(args.checkpoint, quantize=args.quantize)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tok = GLMTokenizer()
    gen = Generator(config, params)
    key = jax.random.key(args.seed)
    outputs = []
    for text in args.prompt:
        print(f">>> {text}")
        key, sub = jax.random.split(key)
        outputs.append(stream(gen, tok, encode_prompt(tok, text), args, sub))
    if args.chat:
        history: list[tuple[str, str]] = []
        while True:
            try:
                query = input("用户 / you: ").strip()
            except EOFError:
                break
            if not query:
                break
            key, sub = jax.random.split(key)
            sys.stdout.write("GLM: ")
            answer = stream(gen, tok, encode_prompt(tok, chat_prompt(history, query)), args, sub)
            history.append((query, answer))
            outputs.append(answer)
    return outputs


if __name__ == "__main__":
    main()
