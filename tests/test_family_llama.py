"""Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma 2 (flax_finetune.modeling.llama): parity, smokes, learning.

Tiny random configs (hidden 32, 2 layers, 4 query heads over 2 key/value heads, vocabulary 99),
one per case, each switching on what its family adds:

- llama: untied output; rope scaling "llama3" (its smoothing band covers a frequency at these
  positions), "linear" and "dynamic" (max_position_embeddings 8 < 10 tokens, so it stretches),
  with attention and MLP biases;
- mistral: sliding_window 4 < the 10 tokens of a row, in every layer;
- qwen2: q/k/v biases, tied output, a sliding window on layer 1 only (max_window_layers 1);
- qwen3: q/k norms, head_dim 16 != 32 / 4;
- gemma: one key/value head, head_dim 16, (1 + w) norms, scaled embeddings, tied output;
- gemma2: gemma plus soft-capping small enough to act (attention 5, final 3), query_pre_attn_scalar 24,
  alternating sliding (window 4) and global layers.

Transformers 4.57's Flax classes (llama, mistral, gemma) rotate with base 10000 whatever the
config says and their Mistral sees sliding_window + 1 keys (and none but itself without a window):
their cases keep rope_theta 10000 and a window longer than the rows (Mistral's with one key/value
head instead); the PyTorch cases cover the rest. Generation: greedy tokens against PyTorch's
generate (llama, gemma2) and beam search against the Flax Llama's, on left-padded prompts.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import family_checks
from conftest import DATA, MODELS, read_results
from learning import Bar, assert_fine_tuning_learned, evaluation_only, text_baselines
from test_language_modeling import clm, clm_command

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config"}
TORCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
                "gemma2": "Gemma2"}
FLAX_CLASSES = {"llama": "FlaxLlamaForCausalLM", "mistral": "FlaxMistralForCausalLM", "gemma": "FlaxGemmaForCausalLM"}


def config(family: str, **overrides):
    settings = dict(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attention_dropout=0.0, tie_word_embeddings=False,
    )
    settings.update(overrides)
    return getattr(transformers, CONFIG_CLASSES[family])(**settings)


CASES = {
    "llama": lambda: config("llama"),
    "llama-rope-llama3": lambda: config("llama", rope_theta=500000.0, attention_bias=True, mlp_bias=True,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-rope-linear": lambda: config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-rope-dynamic": lambda: config("llama", max_position_embeddings=8,
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "mistral": lambda: config("mistral", sliding_window=4),
    "qwen2": lambda: config("qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
                            max_window_layers=1),
    "qwen3": lambda: config("qwen3", head_dim=16),
    "gemma": lambda: config("gemma", head_dim=16, num_key_value_heads=1, tie_word_embeddings=True),
    "gemma2": lambda: config("gemma2", head_dim=16, tie_word_embeddings=True, sliding_window=4,
                             query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
}
FLAX_CASES = {
    "llama": lambda: config("llama"),
    "mistral": lambda: config("mistral", sliding_window=4096, num_key_value_heads=1),
    "gemma": CASES["gemma"],
}


def family_of(case: str) -> str:
    return case.split("-")[0]


# --------------------------------------------------------------------------- parity


@pytest.mark.parity
@pytest.mark.parametrize("case", FLAX_CASES)
def test_flax_parity(case):
    family = family_of(case)
    pytest.importorskip("flax")
    if not hasattr(transformers, FLAX_CLASSES[family]):
        pytest.skip(f"parity needs Transformers' {FLAX_CLASSES[family]} (4.x)")
    settings = FLAX_CASES[case]()
    figures = family_checks.check_flax_parity(family, "causal-lm", settings, FLAX_CLASSES[family],
                                              family_checks.encoder_batches(settings))
    assert figures["losses"][-1] < figures["losses"][0]


@pytest.mark.pytorch
@pytest.mark.parametrize("case", CASES)
def test_pytorch_parity(case, tmp_path):
    family_checks.needs_torch()
    family = family_of(case)
    settings = CASES[case]()
    figures = family_checks.check_pytorch_parity(family, "causal-lm", settings, f"{TORCH_PREFIX[family]}ForCausalLM",
                                                 family_checks.encoder_batches(settings), tmp_path)
    assert figures["losses"][-1] < figures["losses"][0]


def classification_case(family: str):
    """The family's parity config with 3 labels; its batches' padding is the padding id (0)."""
    settings = {"llama": CASES["llama"], "qwen2": CASES["qwen2"], "gemma2": CASES["gemma2"]}[family]()
    settings.num_labels = 3
    return settings


@pytest.mark.pytorch
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_sequence_classification_pytorch_parity(family, tmp_path):
    """The last real token's score (the rightmost id that is not the padding id), as PyTorch pools it."""
    family_checks.needs_torch()
    settings = classification_case(family)
    family_checks.check_pytorch_parity(family, "sequence-classification", settings,
                                       f"{TORCH_PREFIX[family]}ForSequenceClassification",
                                       family_checks.encoder_batches(settings), tmp_path)  # asserts the logits


def test_unknown_rope_type_is_refused():
    from flax_finetune import models

    settings = config("llama")  # set afterwards: Transformers 4.40's config refuses the type itself
    for name in ("rope_parameters", "rope_scaling"):  # Transformers 5's and 4.x's names
        setattr(settings, name, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported; supported: default, linear, dynamic, llama3"):
        models.from_config(settings, "causal-lm")


# --------------------------------------------------------------------------- generation

PROMPT_REAL_TOKENS, PROMPT_LENGTH, MAX_LENGTH = (6, 4, 2), 6, 16


def left_padded_prompt() -> dict:
    """input_ids, attention_mask [3, 6]: 6, 4 and 2 real tokens after the padding id 0."""
    rng = np.random.default_rng(4)
    mask = (np.arange(PROMPT_LENGTH)[None, :] >= PROMPT_LENGTH - np.array(PROMPT_REAL_TOKENS)[:, None]).astype(np.int32)
    return {"input_ids": np.where(mask == 1, rng.integers(4, 99, (3, PROMPT_LENGTH)), 0).astype(np.int32),
            "attention_mask": mask}


@pytest.mark.pytorch
@pytest.mark.parametrize("case", ["llama", "gemma2"])  # GQA; GQA with sliding (4 < 16) and global layers
def test_greedy_generation_matches_pytorch(case, tmp_path):
    """Model.generate's greedy tokens (key/value cache of the key/value heads) equal PyTorch's generate
    on left-padded prompts."""
    from flax_finetune import models

    torch = family_checks.needs_torch()
    family = family_of(case)
    model = models.from_config(CASES[case](), "causal-lm")
    model.params = family_checks.random_params(shapes_of(model.params), seed=5)
    model.save(model.params, str(tmp_path))
    reference = getattr(transformers, f"{TORCH_PREFIX[family]}ForCausalLM").from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    prompt = left_padded_prompt()
    with torch.no_grad():
        expected = reference.generate(
            **{name: torch.from_numpy(value.astype(np.int64)) for name, value in prompt.items()},
            max_length=MAX_LENGTH, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=0).numpy()
    actual = np.asarray(model.generate(model.params, prompt, max_length=MAX_LENGTH))
    np.testing.assert_array_equal(actual, expected)
    assert len({tuple(row) for row in actual[:, PROMPT_LENGTH:].tolist()}) == 3  # the rows generate apart


@pytest.mark.parity
def test_beam_search_matches_flax():
    """Beam search (3 beams, each following its rows of the grouped key/value cache) gives the tokens
    of Transformers' FlaxLlamaForCausalLM.generate on the same parameters and left-padded prompts."""
    from flax_finetune import models

    if not hasattr(transformers, "FlaxLlamaForCausalLM"):
        pytest.skip("parity needs Transformers' FlaxLlamaForCausalLM (4.x)")
    settings = FLAX_CASES["llama"]()
    reference = transformers.FlaxLlamaForCausalLM(settings, _do_init=False)
    tree = jax.eval_shape(lambda rng: reference.init_weights(rng, (1, 4)), jax.random.PRNGKey(0))
    params = family_checks.random_params(tree, seed=5)
    prompt = left_padded_prompt()
    options = dict(max_length=MAX_LENGTH, num_beams=3, eos_token_id=2, pad_token_id=0)
    expected = jax.jit(lambda params, input_ids, attention_mask: reference.generate(
        input_ids, attention_mask=attention_mask, params=params, **options).sequences)(params, **prompt)
    model = models.from_config(settings, "causal-lm")
    np.testing.assert_array_equal(model.generate(params, prompt, **options), expected)


def shapes_of(params):
    """jax.ShapeDtypeStruct leaves of a parameter tree."""
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params)


# --------------------------------------------------------------------------- scripts


def fixture_param(family: str):
    """The family, skipped where the installed Transformers has no config class for it (4.40: Qwen3, Gemma 2)."""
    return pytest.param(family, marks=family_checks.needs_config(family))


@pytest.mark.parametrize("family", [fixture_param(family) for family in FAMILIES])
def test_causal_lm_smoke(family, tmp_path):
    family_checks.smoke_losses("causal-lm", MODELS / f"tiny-{family}", tmp_path, learning_rate=1e-2,
                               extra=("--max_train_samples", "3"))  # 3 prose lines: one batch of blocks


def test_sequence_classification_smoke(tmp_path):
    family_checks.smoke_losses("sequence-classification", MODELS / "tiny-qwen2", tmp_path)


def llama_command(output_dir):
    """The GPT-2 learning test's command line (test_language_modeling) on tiny-llama."""
    command = clm_command(output_dir)
    command[command.index("--model_name_or_path") + 1] = str(MODELS / "tiny-llama")
    return command


@pytest.mark.family_learning
def test_fine_tuning_lowers_perplexity(tmp_path):
    """tiny-llama from random weights on the fixture prose: perplexity below the GPT-2 test's bar,
    which the starting checkpoint and a unigram model of the training text fail."""
    clm().main(evaluation_only(llama_command(tmp_path / "start")))
    clm().main(llama_command(tmp_path / "trained"))
    _, unigram = text_baselines(MODELS / "tiny-llama", DATA / "prose" / "train.txt", DATA / "prose" / "validation.txt")
    assert_fine_tuning_learned([Bar("eval_perplexity", 10.0, lower_is_better=True)], {"eval_loss": 2.0},
                               baseline={"eval_perplexity": unigram}, starting=read_results(tmp_path / "start"),
                               trained=read_results(tmp_path / "trained"))
