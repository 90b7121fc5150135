"""Training text read through the `datasets` library (the `hf` extra).

A source is a `.parquet`, `.jsonl`/`.json` or `.arrow` file, a folder of them (splits named by
file name as on the Hub: `train-*.parquet`, `validation.jsonl`, ...), a `save_to_disk` folder, or
`hf:OWNER/NAME[:CONFIG]` on the Hub. Everything is streamed, never cached as a copy: a corpus
larger than memory reaches `experiments.prepare` a batch of rows at a time.

Splits: `train` is trained on (or the only split, when there is one); the first of `validation`,
`valid`, `val` is the validation split. `test` is never read: it stays held out for a final
evaluation. Without a validation split the documents are split by a hash of their text
(tnt.data.split_stream).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tnt.data import DataError, Documents

SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
# Suffixes that mark a folder as a dataset (a text folder may hold a stray .json config file).
DATASET_ONLY = {".parquet", ".arrow", ".jsonl"}
TRAIN_SPLIT = "train"
VAL_SPLITS = ("validation", "valid", "val")
HUB = re.compile(r"hf:([\w.-]+/[\w.-]+)(?::([\w.-]+))?")
ROWS_PER_BATCH = 1000


def folder_files(root: Path) -> list[Path]:
    """The files of a folder, hidden ones and a top-level dataset card (README.md) left out."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root) != Path("README.md")
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def is_saved(root: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (root / "dataset_dict.json").is_file() or (
        (root / "state.json").is_file() and (root / "dataset_info.json").is_file())


def is_dataset_source(source: str) -> bool:
    """Whether `source` is read through `datasets` rather than as text files. A folder mixing
    dataset files with other files is refused: neither reading would be what was meant."""
    if source.startswith("hf:"):
        return True
    path = Path(source)
    if path.is_file():
        return path.suffix.lower() in SUFFIXES
    if not path.is_dir():
        return False
    if is_saved(path):
        return True
    files = folder_files(path)
    suffixes = {p.suffix.lower() for p in files}
    if files and suffixes <= set(SUFFIXES):
        return True
    if suffixes & DATASET_ONLY:
        other = [p.relative_to(path).as_posix() for p in files if p.suffix.lower() not in SUFFIXES]
        raise DataError(
            f"data folder {source!r} mixes dataset files ({', '.join(sorted(suffixes & DATASET_ONLY))}) "
            f"with other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); "
            f"point --data at a folder of dataset files only, or of text files only")
    return False


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading a dataset needs the `datasets` library: pip install 'tnt[hf]'") from e
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error log repeats our DataError
    return datasets


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_splits(source: str) -> dict[str, object]:
    """The source's splits by name, each a `datasets` Dataset or IterableDataset."""
    datasets = _datasets()
    path = Path(source)
    try:
        if source.startswith("hf:"):
            m = HUB.fullmatch(source)
            if not m:
                raise DataError(f"--data {source!r} is not of the form hf:OWNER/NAME[:CONFIG]")
            try:
                splits = datasets.load_dataset(m[1], m[2], streaming=True)
            except ConnectionError as e:
                why = ("the machine is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if _offline()
                       else "the Hub cannot be reached")
                raise DataError(f"cannot fetch {source}: {why}; download it on a machine that "
                                f"is online (datasets' save_to_disk) and pass that folder") from e
        elif is_saved(path):
            splits = datasets.load_from_disk(str(path))
        elif path.is_file():
            splits = datasets.load_dataset(SUFFIXES[path.suffix.lower()], data_files=str(path),
                                           streaming=True)
        else:
            splits = datasets.load_dataset(str(path), streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds (ValueError, DatasetNotFoundError, ArrowInvalid)
        raise DataError(f"datasets cannot read {source!r}: {type(e).__name__}: {e}") from e
    return dict(splits) if isinstance(splits, dict) else {TRAIN_SPLIT: splits}


def choose_splits(source: str, names: list[str]) -> tuple[str, str | None, str]:
    """(train split, validation split or None, a note naming what is read) by the module's rules."""
    if TRAIN_SPLIT in names:
        train_name = TRAIN_SPLIT
    elif len(names) == 1:
        train_name = names[0]
    else:
        raise DataError(f"dataset {source!r} has no {TRAIN_SPLIT!r} split (it has "
                        f"{', '.join(names)}); keep the training rows in a split named train")
    val_name = next((n for n in VAL_SPLITS if n in names), None)
    unused = [n for n in names if n not in (train_name, val_name)]
    note = (f"note: dataset {source}: training on split {train_name!r}, validating on "
            + (f"split {val_name!r}" if val_name else "a hash-chosen share of its rows")
            + (f" ({', '.join(unused)} not read)" if unused else ""))
    return train_name, val_name, note


def texts(dataset, text_field: str, source: str, split: str) -> Iterator[str]:
    """The text of every row, a batch of rows at a time; None counts as an empty document."""
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise missing_field(text_field, columns, source, split)
    if columns is not None and len(columns) > 1:
        dataset = dataset.select_columns([text_field])  # never decode images or other columns
    row = 0
    for batch in _batches(dataset, source, split):
        if text_field not in batch:
            raise missing_field(text_field, list(batch), source, split)
        for value in batch[text_field]:
            if value is not None and not isinstance(value, str):
                raise DataError(f"field {text_field!r} of row {row} of {source!r} ({split}) "
                                f"holds {type(value).__name__}, not text; choose a text "
                                f"column with --text-field")
            row += 1
            yield value or ""


def _batches(dataset, source: str, split: str) -> Iterator[dict]:
    """The dataset's rows a batch at a time; a file that fails to parse is named."""
    batches = iter(dataset.iter(batch_size=ROWS_PER_BATCH))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # pyarrow's ArrowInvalid, datasets' DatasetGenerationError, OSError
            raise DataError(f"datasets cannot read {source!r} ({split}): {type(e).__name__}: {e}") from e
        yield batch


def missing_field(field: str, columns: Iterable[str], source: str, split: str) -> DataError:
    return DataError(f"dataset {source!r} ({split}) has no text field {field!r}; its columns "
                     f"are {', '.join(columns)} (choose one with --text-field)")


class Rows:
    """The (key, text) documents of one split; the key is the text, so the hash split of
    tnt.data.split_stream depends on neither row order nor sharding."""

    def __init__(self, dataset, text_field: str, source: str, split: str) -> None:
        self.dataset, self.text_field, self.source, self.split = dataset, text_field, source, split

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for text in texts(self.dataset, self.text_field, self.source, self.split):
            yield text, text


def dataset_documents(source: str, text_field: str = "text") -> Documents:
    """The documents of a dataset source, with the split rules of this module."""
    splits = load_splits(source)
    train, val, note = choose_splits(source, list(splits))
    rows = lambda split: Rows(splits[split], text_field, source, split)  # noqa: E731
    return Documents(source, rows(train), None if val is None else rows(val), [note])
