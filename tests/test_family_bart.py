"""BART, mBART, Pegasus and Marian (flax_finetune.modeling.bart): parity, generation, smokes, learning.

Tiny random configs (d_model 32, 2 layers per stack, 4 heads, vocabulary 99) in each family's
layout: BART post-LayerNorm with learned positions, mBART pre-LayerNorm with learned positions,
Pegasus pre-LayerNorm with sinusoids and the padding token as decoder start, Marian
post-LayerNorm with sinusoids (and, in one case, its own encoder and decoder embeddings).

Two differences from a reference are by choice, and the tests say where they show:
- `final_logits_bias` is not trained (a buffer in PyTorch; Transformers' Flax Marian alone
  trains it), so Marian's AdamW steps are compared with PyTorch only;
- looking the padding token up gives no gradient (PyTorch's padding_idx), so Pegasus' AdamW
  steps against its Flax class use a decoder start that is not the padding token.
Transformers 5 loses `requires_grad=False` of Pegasus' and Marian's sinusoidal tables in
from_pretrained (a freshly built model has it): they are frozen again before its AdamW steps.

n-gram blocking (no_repeat_ngram_size, bart-large-cnn's 3) is checked against its definition and
PyTorch's greedy tokens: Transformers' 4.57 Flax processor fails with the tf457 environment's JAX
(bcoo_gather: mode CLIP not supported).
The learning checks train the fixtures from random weights: summarization for every family,
sentence-pair classification for BART.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import family_checks
from conftest import DATA, MODELS, load_script, read_results
from flax_finetune import models
from flax_finetune.modeling import generation
from learning import assert_fine_tuning_learned, evaluation_only
from test_summarization import BARS, summarization, summarization_command, trivial_summary_scores
from test_text_classification import PAIR_BARS, labels, majority_class_scores, paraphrase_command

transformers = pytest.importorskip("transformers")

FAMILIES = ("bart", "mbart", "pegasus", "marian")
CONFIG_CLASSES = {"bart": "BartConfig", "mbart": "MBartConfig", "pegasus": "PegasusConfig", "marian": "MarianConfig"}
FLAX_CLASSES = {
    "bart": "FlaxBartForConditionalGeneration",
    "mbart": "FlaxMBartForConditionalGeneration",
    "pegasus": "FlaxPegasusForConditionalGeneration",
    "marian": "FlaxMarianMTModel",
}
TORCH_CLASSES = {
    "bart": "BartForConditionalGeneration",
    "mbart": "MBartForConditionalGeneration",
    "pegasus": "PegasusForConditionalGeneration",
    "marian": "MarianMTModel",
}
# BART and mBART: <s> 0, <pad> 1, </s> 2 (the decoder start); Pegasus and Marian: pad 0 (the start), eos 1.
SPECIAL_IDS = {
    "bart": dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
    "mbart": dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
    "pegasus": dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "marian": dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}


def config(family: str, **overrides):
    settings = dict(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=family != "bart",
        activation_function="swish" if family == "marian" else "gelu", **SPECIAL_IDS[family],
    )
    settings.update(overrides)
    return getattr(transformers, CONFIG_CLASSES[family])(**settings)


CASES = {
    "bart": lambda: config("bart"),
    "bart-untied": lambda: config("bart", tie_word_embeddings=False),
    "mbart": lambda: config("mbart"),
    "pegasus": lambda: config("pegasus"),
    "marian": lambda: config("marian"),
    "marian-separate": lambda: config("marian", share_encoder_decoder_embeddings=False, decoder_vocab_size=99,
                                      tie_word_embeddings=False),
}


def family_of(case: str) -> str:
    return case.split("-")[0]


# --------------------------------------------------------------------------- parity


# three AdamW steps for BART and for Pegasus (its own decoder start and embedding scale); the other cases compare logits
TRAINED_CASES = ("bart", "pegasus")


@pytest.mark.parity
@pytest.mark.parametrize("case", [case for case in CASES if case != "marian-separate"])  # no Flax class has it
def test_flax_parity(case):
    family = family_of(case)
    pytest.importorskip("flax")
    if not hasattr(transformers, FLAX_CLASSES[family]):
        pytest.skip(f"parity needs Transformers' {FLAX_CLASSES[family]} (4.x)")
    settings = CASES[case]()
    # Pegasus: a decoder start that is not the padding token (see the module docstring)
    training = settings if family != "pegasus" else config("pegasus", decoder_start_token_id=3)
    figures = family_checks.check_flax_parity(family, "seq2seq-lm", settings, FLAX_CLASSES[family],
                                              family_checks.seq2seq_batches(settings), train=False)
    if case in TRAINED_CASES:
        trained = family_checks.check_flax_parity(family, "seq2seq-lm", training, FLAX_CLASSES[family],
                                                  family_checks.seq2seq_batches(training))
        assert trained["losses"][-1] < trained["losses"][0]
    assert figures["max_logit_error"] <= family_checks.ATOL


@pytest.mark.pytorch
@pytest.mark.parametrize("case", [case for case in CASES if case != "bart-untied"])  # see the report: v5 unties embed_tokens
def test_pytorch_parity(case, tmp_path):
    family = family_of(case)
    settings = CASES[case]()
    batches = family_checks.seq2seq_batches(settings)
    figures = family_checks.check_pytorch_parity(family, "seq2seq-lm", settings, TORCH_CLASSES[family], batches,
                                                 tmp_path)
    assert figures["max_logit_error"] <= family_checks.ATOL


def classification_config():
    return config("bart", num_labels=3, classifier_dropout=0.0)


def classification_batches(settings) -> tuple[dict, dict]:
    """Encoder batches whose rows end (the padded ones before their padding) in one </s>."""
    unmasked, masked = family_checks.encoder_batches(settings)
    unmasked["input_ids"][:, -1] = settings.eos_token_id
    for row, length in enumerate(family_checks.LENGTHS):
        masked["input_ids"][row, length - 1] = settings.eos_token_id
    return unmasked, masked


@pytest.mark.parity
def test_sequence_classification_flax_parity():
    if not hasattr(transformers, "FlaxBartForSequenceClassification"):
        pytest.skip("parity needs Transformers' FlaxBartForSequenceClassification (4.x)")
    settings = classification_config()
    family_checks.check_flax_parity("bart", "sequence-classification", settings,  # asserts the logits
                                    "FlaxBartForSequenceClassification", classification_batches(settings))


@pytest.mark.pytorch
def test_sequence_classification_pytorch_parity(tmp_path):
    settings = classification_config()
    family_checks.check_pytorch_parity("bart", "sequence-classification", settings,  # asserts the logits
                                       "BartForSequenceClassification", classification_batches(settings), tmp_path)


# --------------------------------------------------------------------------- generation

MAX_LENGTH = 12

# (case, beams, generation settings): mBART with a forced first token (a target-language code),
# BART with forced BOS and EOS as bart-large-cnn has them, Pegasus starting from its padding token.
GENERATION_CASES = {
    "bart-greedy-forced": ("bart", 1, dict(forced_bos_token_id=0, forced_eos_token_id=2, min_length=3)),
    "mbart-beam-language": ("mbart", 2, dict(forced_bos_token_id=7, length_penalty=1.0)),
    "pegasus-beam": ("pegasus", 3, dict(length_penalty=0.6, early_stopping="never")),
    "marian-beam": ("marian", 4, dict(eos_token_id=6, early_stopping=True)),  # 6: a token it generates
}


@pytest.mark.parity
@pytest.mark.parametrize("name", GENERATION_CASES)
def test_generation_matches_flax(name):
    family, beams, settings = GENERATION_CASES[name]
    if not hasattr(transformers, FLAX_CLASSES[family]):
        pytest.skip(f"parity needs Transformers' {FLAX_CLASSES[family]} (4.x)")
    model_config = config(family)
    reference = getattr(transformers, FLAX_CLASSES[family])(model_config, _do_init=False)
    tree = jax.eval_shape(lambda rng: reference.init_weights(rng, (1, 4)), jax.random.PRNGKey(0))
    params = family_checks.random_params(tree, seed=sum(map(ord, name)))
    _, padded = family_checks.seq2seq_batches(model_config)
    inputs = {key: padded[key] for key in ("input_ids", "attention_mask")}
    generation_config = transformers.GenerationConfig.from_model_config(model_config)
    generation_config.update(num_beams=beams, max_length=MAX_LENGTH, **settings)
    expected = jax.jit(lambda params, inputs: reference.generate(
        **inputs, params=params, generation_config=copy.deepcopy(generation_config)).sequences)(params, inputs)
    module = models.module_class(model_config, "seq2seq-lm")(config=model_config)
    actual = generation.generate(module, params, inputs, **generation.generation_kwargs(generation_config))
    np.testing.assert_array_equal(actual, expected)
    assert np.any(np.asarray(actual)[:, 1:] == generation_config.eos_token_id)  # some row ended before the limit


def repeated_ngrams(sequences, size: int) -> int:
    """How many n-grams of `size` tokens repeat an earlier one of the same row (padding cut off)."""
    count = 0
    for row in np.asarray(sequences).tolist():
        seen = set()
        for start in range(len(row) - size + 1):
            ngram = tuple(row[start:start + size])
            count += ngram in seen
            seen.add(ngram)
    return count


@pytest.mark.parametrize("size", [1, 2, 3])
def test_repeated_ngrams_are_banned_as_defined(size):
    """generation's n-gram blocking against its definition, on random sequences at every step."""
    rng = np.random.default_rng(size)
    sequences = rng.integers(0, 4, (6, MAX_LENGTH)).astype(np.int32)  # 4 tokens: many repeats
    for cur_len in range(MAX_LENGTH):
        scores = np.asarray(generation._ban_repeated_ngrams(jnp.zeros((6, 4)), jnp.asarray(sequences), cur_len, size))
        for row, tokens in enumerate(sequences[:, :cur_len].tolist()):
            prefix = tuple(tokens[len(tokens) - size + 1:]) if size > 1 else ()
            banned = {tuple(tokens[start:start + size])[-1] for start in range(len(tokens) - size + 1)
                      if tuple(tokens[start:start + size - 1]) == prefix} if cur_len >= size - 1 else set()
            assert set(np.flatnonzero(np.isinf(scores[row])).tolist()) == banned


def no_repeat_case(family: str, seed: int):
    """A random model (its end token one it does not generate), its params and padded inputs."""
    model_config = config(family, eos_token_id=98, forced_eos_token_id=None)
    module = models.module_class(model_config, "seq2seq-lm")(config=model_config)
    shapes = jax.eval_shape(models.init_function(module, model_config, "seq2seq-lm"), jax.random.PRNGKey(0))
    _, padded = family_checks.seq2seq_batches(model_config)
    inputs = {key: padded[key] for key in ("input_ids", "attention_mask")}
    return model_config, module, family_checks.random_params(shapes, seed), inputs


def test_no_repeat_ngram_size_leaves_no_repeat_in_beams():
    """bart-large-cnn's n-gram blocking in beam search (no Flax reference, see the module docstring):
    no repeated bigram is left, where the same model repeats one without it."""
    beams, size = 2, 2
    model_config, module, params, inputs = no_repeat_case("marian", seed=size)
    options = dict(max_length=MAX_LENGTH, num_beams=beams, decoder_start_token_id=model_config.decoder_start_token_id,
                   eos_token_id=98, pad_token_id=model_config.pad_token_id)
    blocked = generation.generate(module, params, inputs, **options, no_repeat_ngram_size=size)
    assert repeated_ngrams(blocked, size) == 0
    assert repeated_ngrams(generation.generate(module, params, inputs, **options), size) > 0


@pytest.mark.pytorch
def test_no_repeat_ngram_size_matches_pytorch_greedy(tmp_path):
    torch = family_checks.needs_torch()
    model_config, module, params, inputs = no_repeat_case("bart", seed=2)
    models.Model(module, params, model_config).save(params, str(tmp_path))
    reference = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch_inputs = {name: torch.from_numpy(np.asarray(value, np.int64)) for name, value in inputs.items()}
    with torch.no_grad():
        expected, unblocked = (reference.generate(**torch_inputs, max_length=MAX_LENGTH, num_beams=1, do_sample=False,
                                                  no_repeat_ngram_size=size).numpy() for size in (2, 0))
    assert repeated_ngrams(unblocked, 2) > 0  # the blocking changes these tokens
    model = models.load(str(tmp_path), "seq2seq-lm")
    actual = model.generate(model.params, inputs, max_length=MAX_LENGTH, num_beams=1, no_repeat_ngram_size=2)
    np.testing.assert_array_equal(actual, expected)
    assert repeated_ngrams(actual, 2) == 0


def test_generation_refuses_what_it_does_not_do():
    """Settings that would change the tokens are refused (the script before training), one-token
    bad words (opus-mt's [[pad]]) are suppressed tokens."""
    from flax_finetune import seq2seq
    from flax_finetune.errors import InputError

    marian = transformers.GenerationConfig(bad_words_ids=[[5]], suppress_tokens=[3], eos_token_id=0)
    assert generation.generation_kwargs(marian)["suppress_tokens"] == [3, 5]
    for settings, named in ((dict(repetition_penalty=1.2), "repetition_penalty=1.2"),
                            (dict(bad_words_ids=[[5, 6]]), "bad_words_ids of several tokens"),
                            (dict(num_beam_groups=2, num_beams=2, diversity_penalty=0.5), "num_beam_groups=2")):
        with pytest.raises(ValueError, match=named):
            generation.generation_kwargs(transformers.GenerationConfig(**settings))
    model = models.load(str(MODELS / "tiny-bart"), "seq2seq-lm")
    assert seq2seq.generation_options(model, 24, None) == {"max_length": 24, "num_beams": 1}
    model.generation_config.encoder_no_repeat_ngram_size = 3
    with pytest.raises(InputError, match="encoder_no_repeat_ngram_size=3"):
        seq2seq.generation_options(model, 24, 4)


# --------------------------------------------------------------------------- scripts

# mBART's fixture tokenizer has language codes: the smoke and learning runs name them.
LANGUAGE_FLAGS = {"mbart": ("--source_lang", "en_XX", "--target_lang", "en_XX")}


@pytest.mark.parametrize("family", FAMILIES)
def test_summarization_smoke(family, tmp_path):
    family_checks.smoke_losses("seq2seq-lm", MODELS / f"tiny-{family}", tmp_path, learning_rate=1e-2,
                               extra=LANGUAGE_FLAGS.get(family, ()))


def test_sequence_classification_smoke(tmp_path):
    family_checks.smoke_losses("sequence-classification", MODELS / "tiny-bart", tmp_path, learning_rate=1e-2)


def test_language_flags(tmp_path):
    """mBART: the target code is the decoder start (its labels end with it); unknown codes and
    codes for a tokenizer without any are input errors."""
    from flax_finetune import models as model_layer, seq2seq
    from flax_finetune.errors import InputError

    tokenizer = model_layer.load_tokenizer(str(MODELS / "tiny-mbart"))
    settings = seq2seq.language_settings(tokenizer, "en_XX", "de_DE")
    assert settings == {"decoder_start_token_id": tokenizer.convert_tokens_to_ids("de_DE")}
    assert tokenizer(text_target="Ada")["input_ids"][-1] == settings["decoder_start_token_id"]
    with pytest.raises(InputError, match="xx_YY"):
        seq2seq.language_settings(tokenizer, "en_XX", "xx_YY")
    with pytest.raises(InputError, match="no language codes"):
        seq2seq.language_settings(model_layer.load_tokenizer(str(MODELS / "tiny-pegasus")), None, "de_DE")
    assert seq2seq.language_settings(tokenizer, None, None, forced_bos_token="de_DE") == {
        "forced_bos_token_id": tokenizer.convert_tokens_to_ids("de_DE")}


# From random weights, as the mT5 fixtures: 15 epochs at 5e-3, the summarization test's bars,
# trivial summaries and margins (measured on the test split: ROUGE-1 99.3-100, ROUGE-2 95.3-100).
FROM_SCRATCH = ("--num_train_epochs=15", "--learning_rate=5e-3", "--max_target_length=24")


@pytest.mark.family_learning
@pytest.mark.parametrize("family", FAMILIES)
def test_summarization_learns(family, tmp_path):
    model = ("--model_name_or_path", str(MODELS / f"tiny-{family}"))
    options = (*FROM_SCRATCH, *LANGUAGE_FLAGS.get(family, ()))
    summarization().main(evaluation_only([*summarization_command(tmp_path / "start", *model), *options]))
    summarization().main([*summarization_command(tmp_path / "trained", *model), *options])
    assert_fine_tuning_learned(BARS, {"test_loss": 1.0, "test_rouge1": 20, "test_rouge2": 20},
                               baseline=trivial_summary_scores(), starting=read_results(tmp_path / "start", "test"),
                               trained=read_results(tmp_path / "trained", "test"))
    predictions = (tmp_path / "trained" / "generated_predictions.txt").read_text().splitlines()
    assert len(predictions) == 16 and all(" met " in line for line in predictions)


@pytest.mark.family_learning
def test_sequence_classification_learns_sentence_pairs(tmp_path):
    """tiny-bart's encoder-decoder with a new classification head, on the paraphrase pairs, at 1e-3
    (the test command's 1e-4 is for d_model 64 models: here eval_accuracy 0.83 at 1e-4, 0.96 at 1e-3)."""
    glue = load_script("text-classification/run_flax_glue.py")
    starting = paraphrase_command(tmp_path / "start", model="tiny-bart")
    del starting[starting.index("--train_file"):starting.index("--train_file") + 2]
    glue.main(starting + ["--do_eval"])  # without a training file: evaluation only
    glue.main([*paraphrase_command(tmp_path / "trained", model="tiny-bart"), "--learning_rate=1e-3"])
    baseline = majority_class_scores(labels(DATA / "paraphrase" / "train.csv"),
                                     labels(DATA / "paraphrase" / "validation.csv"))
    assert_fine_tuning_learned(PAIR_BARS, {"eval_loss": 0.1, "eval_accuracy": 0.25}, baseline=baseline,
                               starting=read_results(tmp_path / "start"), trained=read_results(tmp_path / "trained"))
