"""Text completion and chat from a checkpoint, streaming tokens as they come.

    python experiments/generate.py --prompt "The meaning of life is" [--max-new 64] [--temperature 0.8]
    python experiments/generate.py --chat            # interactive; an empty line quits
    python experiments/generate.py --chat --json < queries.txt   # one query a line -> one JSON line a turn
    python experiments/generate.py --prompt "..." --num-beams 4 [--length-penalty 1 --no-repeat-ngram 3 --all-beams]

The checkpoint's family (recorded by pretrain/convert/quantize) builds the prompts exactly as the
released code does: GLM-130B's and ours read literal [MASK]/[sMASK]/[gMASK] blanks (otherwise the
text is continued after [gMASK]) and fill several blanks of one kind first to last, as GLM-130B's
generate.py does (`generate.fill_blanks`); ChatGLM-6B / ChatGLM2 / ChatGLM3 use their own chat formats and
stop tokens, and replies are post-processed as their chat code does. A chat drops its oldest rounds
when the prompt would not fit max_sequence_length minus --max-new (and says so on stderr); a
completion prompt that does not fit is an error. Greedy when --temperature is 0; otherwise
temperature / top-k / top-p sampling with --seed; --num-beams N runs GLM-130B's beam search
(glm_jax/beam.py) on each --prompt and prints the best beam, or every final beam with --all-beams.
"""

import argparse
import json
import sys

from glm_jax.script_args import add_checkpoint_args, load_model_or_exit, parse_args


def stream(gen, model, ids, args, key, show: bool) -> tuple[str, list[int]]:
    """Generate for one prompt, printing text as tokens arrive (if show) -> (raw text, ids)."""
    out: list[int] = []
    shown = [""]
    stops = set(model.family.stop_ids(model.tokenizer))

    def on_token(step, tokens):
        token = int(tokens[0])
        if token in stops:  # the last call: generation ends with it
            return
        out.append(token)
        if show:
            text = model.tokenizer.decode(out)
            sys.stdout.write(text[len(shown[0]) :])
            sys.stdout.flush()
            shown[0] = text

    result = gen.generate(
        [ids],
        args.max_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        key=key,
        on_token=on_token,
        stop_tokens=tuple(stops),
    )[0]
    if show:
        print()
    return model.tokenizer.decode(result), result


def beams(gen, model, text, ids, args) -> list[dict]:
    """Beam search on one prompt; prints the best beam (or all of them) -> [{"text", "ids", "score"}]."""
    stops = model.family.stop_ids(model.tokenizer)
    found = gen.beam_search(
        ids,
        args.num_beams,
        args.max_new,
        length_penalty=args.length_penalty,
        no_repeat_ngram=args.no_repeat_ngram,
        stop_tokens=stops,
    )
    out = [
        {"text": model.tokenizer.decode([t for t in tokens if t not in stops]), "ids": tokens, "score": score}
        for tokens, score in found
    ]
    shown = out if args.all_beams else out[:1]
    if args.json:
        print(json.dumps({"prompt": text, "beams": shown, **model.placement_summary()}, ensure_ascii=False), flush=True)
    else:
        print(f">>> {text}")
        for beam in shown:
            print(f"[{beam['score']:.4f}] {beam['text']}")
    return shown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument(
        "--json",
        action="store_true",
        help="one JSON line per prompt (--prompt) or per turn (--chat, queries from stdin)",
    )
    ap.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (--prompt)")
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--no-repeat-ngram", type=int, default=0)
    ap.add_argument("--all-beams", action="store_true", help="print every final beam, best first")
    ap.add_argument("--system", default=None, help="a system prompt for --chat")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, argv)
    if not args.prompt and not args.chat:
        ap.error("give --prompt TEXT (repeatable) or --chat")
    if args.num_beams < 1 or (args.num_beams > 1 and args.chat):
        ap.error("--num-beams must be positive, and beam search is for --prompt (not --chat)")
    if args.max_new <= 0:
        ap.error("--max-new must be positive")
    import jax

    from glm_jax.families import FamilyError
    from glm_jax.generate import GenerationError, Generator, fill_blanks

    model = load_model_or_exit(args)
    fam, tok = model.family, model.tokenizer
    max_len = model.config.max_sequence_length
    if args.max_new >= max_len:
        ap.error(f"--max-new {args.max_new} leaves no room for a prompt (max_sequence_length={max_len})")
    gen = Generator(
        model.config, model.take_params(), ids=tok.specials, causal=fam.causal, mesh=model.mesh, consume=True
    )
    key = jax.random.key(args.seed)
    where = model.placement_summary()  # every --json record says where the model runs
    limit = max_len - args.max_new
    outputs = []
    try:
        for text in args.prompt:
            ids = fam.generation_prompt(tok, text)
            if args.num_beams > 1:
                outputs.append(beams(gen, model, text, ids, args))
                continue
            if not fam.causal and sum(t in tok.specials.mask_tokens for t in ids) > 1:  # several blanks
                key, sub = jax.random.split(key)
                filled, blanks = fill_blanks(
                    gen,
                    ids,
                    args.max_new,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    key=sub,
                    stop_tokens=fam.stop_ids(tok),
                )
                result = {"prompt": text, "text": tok.decode(filled), "blanks": [tok.decode(blank) for blank in blanks]}
                print(
                    json.dumps({**result, **where}, ensure_ascii=False)
                    if args.json
                    else f">>> {text}\n{result['text']}",
                    flush=True,
                )
                outputs.append(result["text"])
                continue
            if not args.json:
                print(f">>> {text}")
            key, sub = jax.random.split(key)
            raw, generated = stream(gen, model, ids, args, sub, show=not args.json)
            outputs.append(raw)
            if args.json:
                print(
                    json.dumps({"prompt": text, "text": raw, "ids": generated, **where}, ensure_ascii=False), flush=True
                )
        if args.chat:
            history: list[tuple[str, str]] = []
            lines = sys.stdin if args.json else None
            while True:
                if lines is not None:
                    query = next(lines, None)
                    if query is None:
                        break
                    query = query.rstrip("\n")
                    if not query.strip():
                        continue
                else:
                    try:
                        query = input("用户 / you: ").strip()
                    except EOFError:
                        break
                    if not query:
                        break
                ids, dropped = fam.fit_chat(tok, history, query, limit, args.system)
                if dropped:
                    print(
                        f"(the prompt would not fit {limit} tokens: dropped the oldest {dropped} round(s))",
                        file=sys.stderr,
                    )
                    history = history[dropped:]
                key, sub = jax.random.split(key)
                if not args.json:
                    sys.stdout.write("GLM: ")
                raw, generated = stream(gen, model, ids, args, sub, show=not args.json)
                reply = fam.postprocess(raw)
                history.append((query, reply))
                outputs.append(reply)
                if args.json:
                    print(
                        json.dumps({"query": query, "reply": reply, "ids": generated, **where}, ensure_ascii=False),
                        flush=True,
                    )
    except (GenerationError, FamilyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return outputs


if __name__ == "__main__":
    main()
