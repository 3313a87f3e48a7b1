"""TRL ``environment_factory`` adapters (retroformer_cli/envs/trl_tools.py), the tool chat template and the
actor GRPO recipe: scripted policies through the tools, TRL's own template checks, and one real
``GRPOTrainer.train()`` step on a tiny random Llama whose sampling is forced to a scripted tool-using policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from retroformer_cli.envs.hotpotqa import load_questions
from retroformer_cli.envs.trl_tools import (ADAPTERS, EPISODE_OVER, ALFWorldTools, HotPotQATools, WebShopTools,
                                            adapter_for, tool_names)
from retroformer_cli.errors import UsageError
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]
HOTPOT = ROOT / "sample_data" / "hotpotqa"


def _answerable():
    """(question, supporting title whose page holds the answer, answer) of the sample questions."""
    out = []
    for q in load_questions(HOTPOT):
        pages = dict(q.context)
        for title, _ in q.supporting_facts:
            if q.answer in "".join(pages.get(title, [])):
                out.append((q, title, q.answer))
                break
    return out


# --- the TRL contract ----------------------------------------------------------------------------
def test_tools_are_what_trl_exposes_with_schemas():
    from transformers.utils import get_json_schema

    assert tool_names(HotPotQATools) == ["finish", "lookup", "search"]
    assert tool_names(WebShopTools) == ["click", "search"]
    assert tool_names(ALFWorldTools) == ["act"]
    for cls in ADAPTERS.values():
        for name in tool_names(cls):
            fn = get_json_schema(getattr(cls, name))["function"]
            (arg,) = fn["parameters"]["properties"].items()  # one typed, described string argument
            assert arg[1]["type"] == "string" and arg[1]["description"] and fn["parameters"]["required"] == [arg[0]]
    assert adapter_for("HotPotQA-v0") is HotPotQATools
    with pytest.raises(UsageError, match="Unknown environment"):
        adapter_for("chess")


# --- scripted policies ----------------------------------------------------------------------------
def test_hotpotqa_scripted_episode_reward_and_bad_calls():
    q, title, answer = _answerable()[0]
    make = HotPotQATools.factory(data=str(HOTPOT))
    env, other = make(), make()
    assert env._env is not other._env  # one episode state per instance, data shared
    obs = env.reset(task_id=q.id, prompt=[{"role": "user", "content": "Answer it."}])  # TRL passes the row's columns
    assert obs == "Question: " + q.question.strip()
    placeholder = env.reset(task_id=q.id, prompt=[{"role": "user", "content": ""}])  # TRL without a dataset
    assert placeholder == f"{HotPotQATools.instructions}\n\n{obs}"
    assert env.search().startswith("Invalid call: missing a required argument: 'entity'")
    assert env.search(entity="x", page=2).startswith("Invalid call: got an unexpected keyword argument 'page'")
    assert env.lookup(keyword="anything").startswith("No page is loaded yet")
    assert answer in env.search(entity=title)
    assert answer in env.lookup(keyword=answer)
    assert env.finish(answer=answer) == "Answer is CORRECT"
    assert env.get_reward() == 1.0 and other.get_reward() == 0.0
    assert env.finish(answer="again") == EPISODE_OVER and env.get_reward() == 1.0
    assert [a for a, _ in env._trace] == ["Lookup[anything]", f"Search[{title}]", f"Lookup[{answer}]", f"Finish[{answer}]"]
    env.reset(task_id=q.id)  # a pooled instance starts afresh
    assert env.get_reward() == 0.0 and env._trace == []


def test_hotpotqa_f1_reward_step_limit_and_task_cycle():
    q, _, answer = _answerable()[0]
    make = HotPotQATools.factory(data=str(HOTPOT), reward="f1", max_steps=2)
    env = make()
    env.reset(task_id=q.id)
    env.finish(answer=f"{answer} probably")  # EM 0, F1 > 0
    assert 0.0 < env.get_reward() < 1.0
    env.reset(task_id=q.id)
    env.search(entity="nothing at all")
    assert env.search(entity="still nothing").endswith(f"The step limit is reached. {EPISODE_OVER}")
    assert env.get_reward() == 0.0
    ids = [q.id for q in load_questions(HOTPOT)]
    grouped = HotPotQATools.factory(data=str(HOTPOT), group_size=2)  # no task_id: tasks in turn, 2 resets each
    pool = [grouped() for _ in range(5)]
    for env in pool:
        env.reset(prompt=[{"role": "user", "content": ""}])
    assert [env._task for env in pool] == [ids[0], ids[0], ids[1], ids[1], ids[2]]
    pool[0].reset()
    assert pool[0]._task == ids[2]
    with pytest.raises(UsageError, match="group_size must be a positive integer"):
        HotPotQATools.factory(data=str(HOTPOT), group_size=0)
    with pytest.raises(UsageError, match="reward 'bleu'"):
        HotPotQATools.factory(data=str(HOTPOT), reward="bleu")


def test_webshop_scripted_purchase():
    make = WebShopTools.factory()
    shop = make()
    shop.reset(task_id="fixed_0")
    goal = shop._env.goals[0]
    assert goal["asin"] in shop.search(keywords=goal["query"])
    assert shop.search(keywords="socks").startswith("Invalid action: there is no search box")
    assert "is not available on this page" in shop.click(button="Checkout")
    shop.click(button=goal["asin"])
    for value in goal["goal_options"].values():
        shop.click(button=value)
    shop.click(button="Buy Now")
    assert shop.get_reward() == 1.0 and shop._done
    assert shop.click(button="Buy Now") == EPISODE_OVER


@pytest.mark.shared_data
def test_alfworld_scripted_walkthrough_wins():
    from retroformer_cli.envs.alfworld.worker import missing_dependency

    if missing_dependency() is not None:
        pytest.skip("alfworld is not installed")
    make = ALFWorldTools.factory(data=str(shared_data("alfworld")))
    game, idle = make(), make()
    game.reset()
    assert game._env.process is False  # in-process engines: TRL calls tools one at a time
    assert game.act(command="fly to the moon") == "Nothing happens."
    assert game.act(command="think: where is it?").startswith("Invalid call")
    for command in game._env.walkthrough(game._task):
        game.act(command=command)
    assert game.get_reward() == 1.0 and idle.get_reward() == 0.0
    assert game.act(command="look") == EPISODE_OVER


# --- the tool chat template -----------------------------------------------------------------------
def tiny_tokenizer(chat_template: str | None = None):
    """A byte-level tokenizer (one token per byte, no merges) with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = chat_template
    return fast


# The embedded SmolLM2's kind of template: ChatML turns from message['content'] only (tool calls dropped).
PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_tool_template_replaces_a_template_without_tools():
    from trl.chat_template_utils import is_chat_template_prefix_preserving, parse_response, supports_tool_calling

    from retroformer_cli.llm.tool_chat import install

    tok = tiny_tokenizer(PLAIN_CHATML)
    assert not supports_tool_calling(tok)
    with pytest.raises(UsageError, match="cannot render tool calls"):
        install(tok, "model")
    assert install(tok, "auto") == "tools"
    assert supports_tool_calling(tok) and is_chat_template_prefix_preserving(tok)
    assert install(tok, "auto") == "tools"  # already ours (a checkpoint of the recipe): still ours
    env = HotPotQATools.factory(data=str(HOTPOT))()
    tools = [env.search, env.lookup, env.finish]
    prefix = tok.apply_chat_template([{"role": "user", "content": "Q"}], tools=tools, add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    assert '"name": "lookup"' in tok.decode(prefix)
    said = tok('I will look.<tool_call>{"name": "search", "arguments": {"entity": "Ed Wood"}}</tool_call><|im_end|>',
               add_special_tokens=False).input_ids
    parsed = parse_response(tok, said, prefix=prefix, tools=tools)
    assert parsed["content"] == "I will look."
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "search", "arguments": {"entity": "Ed Wood"}}}]
    broken = tok('<tool_call>{"name": "sea</tool_call><|im_end|>', add_special_tokens=False).input_ids
    assert "tool_calls" not in parse_response(tok, broken, prefix=prefix, tools=tools)
    no_chatml = tiny_tokenizer(PLAIN_CHATML)
    no_chatml.convert_tokens_to_ids = lambda token: None  # a vocabulary without the ChatML tokens
    with pytest.raises(UsageError, match="needs the tokens"):
        install(no_chatml, "tools")


# --- one real GRPO step ------------------------------------------------------------------------------
def _scripted_llama(tok, script):
    """A tiny random Llama whose sampling is forced to ``script(conversation, row) -> reply`` token by token:
    generation, tool parsing, the tool loop, log-probs, loss and the LoRA update all stay TRL's real code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            for row, ids in enumerate(input_ids.tolist()):
                start = max(i for i in range(len(ids) - len(header) + 1) if ids[i:i + len(header)] == header)
                turn = tok(script(tok.decode(ids[:start]), row) + "<|im_end|>", add_special_tokens=False).input_ids
                done = len(ids) - start - len(header)
                forced[row, turn[min(done, len(turn) - 1)]] = 0.0
            return forced

    class Scripted(LlamaForCausalLM):
        def generate(self, *args, **kwargs):
            kwargs["logits_processor"] = LogitsProcessorList([Force()])
            return super().generate(*args, **kwargs)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Scripted(config)


def _hotpotqa_script(cases):
    by_question = {q.question.strip(): (title, answer) for q, title, answer in cases}

    def script(conversation: str, row: int) -> str:
        """Search the right page (even rows of the first turn) or a missing one (odd rows), then finish with
        the answer when the page showed it; after the verdict, stop calling tools."""
        title, answer = next(v for k, v in by_question.items() if k in conversation)
        results = conversation.split("<|im_start|>tool\n")
        if len(results) == 1:
            entity = title if row % 2 == 0 else "Zzyzx Nowhere"
            return f'<tool_call>{{"name": "search", "arguments": {{"entity": {json.dumps(entity)}}}}}</tool_call>'
        if len(results) == 2:
            said = answer if answer in results[-1] else "unknown"
            return f'<tool_call>{{"name": "finish", "arguments": {{"answer": {json.dumps(said)}}}}}</tool_call>'
        return "Done."

    return script


def _lora_b_norm(path: Path) -> float:
    """Largest |weight| of the saved adapter's lora_B matrices: 0 at initialisation (peft's default), so > 0 means
    an optimizer step changed the weights."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert b, sorted(tensors)
    return max(float(t.abs().max()) for t in b)


def test_one_grpo_step_calls_the_tools(workspace):
    from retroformer_cli.stages.actor_grpo import ActorGRPOConfig, run

    cases = _answerable()[:2]
    script = _hotpotqa_script(cases)
    tok = tiny_tokenizer(PLAIN_CHATML)
    model = _scripted_llama(tok, script)
    made = []
    inner = HotPotQATools.factory(data=str(HOTPOT))

    def factory():
        made.append(inner())
        return made[-1]

    cfg = ActorGRPOConfig(env="hotpotqa", split="all", task_ids=[q.id for q, _, _ in cases], max_steps=1,
                          num_generations=2, prompts_per_step=2, max_completion_length=1024, threads=1)
    result = run(cfg, workspace, model=model, tokenizer=tok, environment_factory=factory, progress=False)

    assert result.steps == 1 and result.chat_template == "tools" and result.tasks == 2
    episodes = [m for m in made if m._task is not None]
    assert len(episodes) == 4  # 2 tasks x 2 generations, one instance each
    actions = sorted(tuple(a.split("[")[0] for a, _ in m._trace) for m in episodes)
    assert actions == [("Search", "Finish")] * 4
    assert sorted(m.get_reward() for m in episodes) == [0.0, 0.0, 1.0, 1.0]
    log = next(h for h in result.log_history if "reward" in h)
    assert log["reward"] == pytest.approx(0.5) and log["tools/call_frequency"] == pytest.approx(2.0)
    assert log["tools/failure_frequency"] == 0.0 and log["grad_norm"] > 0 and log["frac_reward_zero_std"] == 0.0
    assert math.isfinite(result.metrics["train_loss"])
    assert (result.path / "adapter_config.json").is_file() and _lora_b_norm(result.path) > 0
    manifest = json.loads((result.path / "retroformer_checkpoint.json").read_text(encoding="utf-8"))
    assert manifest["stage"] == "actor-grpo" and manifest["chat_template"] == "tools"


def test_grpo_trainer_without_a_dataset_plays_one_task_per_group(tmp_path):
    """TRL's other mode: no train_dataset, the environment picks the task; both episodes of a group share it."""
    import os

    from trl import GRPOConfig, GRPOTrainer

    from retroformer_cli.llm.tool_chat import install

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cases = _answerable()[:2]
    ids = [q.id for q, _, _ in cases]
    lines = (HOTPOT / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "two.jsonl"  # the env's own tasks: two questions one page answers
    data.write_text("\n".join(line for i in ids for line in lines if f'"{i}"' in line) + "\n", encoding="utf-8")
    tok = tiny_tokenizer(PLAIN_CHATML)
    install(tok)
    made = []
    inner = HotPotQATools.factory(data=str(data), group_size=2)

    def factory():
        made.append(inner())
        return made[-1]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=1024, report_to="none", disable_tqdm=True, save_strategy="no",
                      use_cpu=True, bf16=False, learning_rate=1e-5, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=_scripted_llama(tok, _hotpotqa_script(cases)), args=args, processing_class=tok,
                          environment_factory=factory)
    trainer.train()
    played = [(m._task, m.get_reward()) for m in made if m._task is not None]
    assert played == [(ids[0], 1.0), (ids[0], 0.0), (ids[1], 1.0), (ids[1], 0.0)]
    assert trainer.state.log_history[0]["tools/call_frequency"] == pytest.approx(2.0)


# --- the recipe script -----------------------------------------------------------------------------
def _recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_actor_recipe", ROOT / "recipes" / "grpo_actor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_flags_become_the_config():
    recipe = _recipe()
    args = recipe.parser().parse_args(
        ["--env", "alfworld", "--max-steps", "3", "--learning-rate", "2e-5", "--gradient-checkpointing",
         "--task-ids", "a, b", "--env-option", "wording=react", "--env-option", "cache_games=2", "--lora-r", "4",
         "--max-tool-calls", "7"])
    cfg = recipe.config_from(args)
    assert (cfg.env, cfg.max_steps, cfg.learning_rate, cfg.gradient_checkpointing) == ("alfworld", 3, 2e-5, True)
    assert cfg.task_ids == ["a", "b"] and cfg.env_options == {"wording": "react", "cache_games": 2}
    assert cfg.lora.r == 4 and cfg.max_tool_calls == 7 and cfg.tasks is None
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        recipe.config_from(recipe.parser().parse_args(["--env-option", "wording"]))


def test_recipe_reports_user_errors_in_one_line(tmp_path, capsys):
    recipe = _recipe()
    assert recipe.main(["--workspace", str(tmp_path / "ws"), "--num-generations", "1"]) == 2
    assert recipe.main(["--workspace", str(tmp_path / "ws"), "--env", "webshop", "--reward", "f1"]) == 2
    assert recipe.main(["--workspace", str(tmp_path / "ws"), "--env", "chess"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["Error"] * 3 and "Traceback" not in "".join(err)
    assert "at least 2" in err[0] and "HotPotQA only" in err[1] and "Unknown environment 'chess'" in err[2]


@pytest.mark.slow
def test_embedded_model_trains_through_our_tool_template(workspace, embedded_cache, monkeypatch):
    """The embedded SmolLM2's own template drops tool calls, so ``auto`` installs ours; one real step."""
    from retroformer_cli.stages.actor_grpo import ActorGRPOConfig, run

    monkeypatch.setattr(type(workspace), "cache_dir", property(lambda self: embedded_cache))
    q, _, _ = _answerable()[0]
    inner, resets = HotPotQATools.factory(data=str(HOTPOT)), []

    def factory():
        """The episodes of a group get rewards 1 and 0 (a 135M model rarely earns one): GRPO has an advantage to
        learn from, so the step must move the weights."""
        tools = inner()
        reset = tools.reset

        def counted_reset(**kwargs):
            resets.append(tools)
            return reset(**kwargs)

        tools.reset = counted_reset
        tools.get_reward = lambda: float(resets.index(tools) % 2 == 0)
        return tools

    cfg = ActorGRPOConfig(env="hotpotqa", split="all", task_ids=[q.id], max_steps=1, num_generations=2,
                          max_completion_length=48, threads=1, name="embedded")
    result = run(cfg, workspace, progress=False, environment_factory=factory)
    assert result.steps == 1 and result.chat_template == "tools"
    assert math.isfinite(result.metrics["train_loss"])
    log = next(h for h in result.log_history if "reward" in h)
    assert log["frac_reward_zero_std"] == 0.0 and log["grad_norm"] > 0, log
    assert _lora_b_norm(result.path) > 0, "one GRPO step changed the LoRA weights"
    from transformers import AutoTokenizer

    from retroformer_cli.llm.tool_chat import TOOL_CHAT_TEMPLATE

    assert AutoTokenizer.from_pretrained(str(result.path)).chat_template == TOOL_CHAT_TEMPLATE
    assert json.loads((result.path / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded"
