"""A label database as a recipe dataset (``format: label_db``): exactly the examples of ``format: rankings`` on
the project's export, on SQLite and Postgres; its errors name the recipe's file and field."""

from __future__ import annotations

import textwrap
from math import comb

import pytest

from lmcycle.cli.main import main
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.errors import LmcycleError
from lmcycle.feedback.export import write_export
from lmcycle.feedback.labels import Label
from lmcycle.stages.context import load_datasets
from lmcycle.stages.recipe import load_recipe

N_PROMPTS = 12  # 15% of 12 prompts: 2 in the test split


def _rank(labeler: str, ids: list[str], n: int) -> Label:
    """ann orders by id, bob reverses it with a tie at the bottom, cy calls every third item unsafe."""
    if labeler == "cy" and n % 3 == 0:
        return Label(special="unsafe", reason="harmful")
    if labeler == "bob":
        return Label(ranking=[[ids[2]], [ids[1], ids[0]]])
    return Label(ranking=[[i] for i in ids])


@pytest.fixture
def labelled(store, users, tmp_path, item_row, write_rows):
    """A project of 12 items (k = 3, overlap 2) labelled by ann, bob and cy; returns the number of strict pairs
    their labels give."""
    store.import_file(write_rows(tmp_path / "items.jsonl", [item_row(f"p{i}") for i in range(N_PROMPTS)]))
    pairs = n = 0
    while tasks := [(labeler, task) for labeler in users if (task := store.next_item_for(labeler)) is not None]:
        for labeler, task in tasks:  # in turns: every labeler labels some items
            label = _rank(labeler, sorted(c.id for c in task.completions), n)
            store.submit(labeler, task.item_id, label, f"{labeler}-{n}")
            if label.ranking is not None:
                pairs += comb(3, 2) - sum(comb(len(group), 2) for group in label.ranking)
            n += 1
    return pairs


def test_a_label_database_gives_the_examples_of_its_rankings_export(store, db_url, labelled, tmp_path):
    exported = tmp_path / "rankings.jsonl"
    write_export(store.snapshot(), exported)
    for split in ("train", "test", "all"):
        from_file = load_examples(DatasetConfig(format="rankings", path=str(exported), split=split))
        from_db = load_examples(DatasetConfig(format="label_db", path=db_url, split=split))
        assert from_db == from_file and from_db, split
    every = load_examples(DatasetConfig(format="label_db", path=db_url, split="all", project="default"))
    assert len(every) == labelled  # ann's 3 pairs per item, bob's 2 (one tie), cy's none when unsafe
    assert {e.meta["labeler"] for e in every} == {"ann", "bob", "cy"}
    assert len(load_examples(DatasetConfig(format="label_db", path=db_url, split="all", limit=5))) == 5


def _recipe(tmp_path, data: str):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
    name: t
    data:
      prefs: {data}
    stages:
      - {{type: report}}
    """))
    return path


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # paths are about SQLite files
def test_a_relative_path_is_the_recipe_folders_and_bad_ones_name_the_recipe_field(tmp_path, labelled, capsys):
    recipe, _ = load_recipe(_recipe(tmp_path, "{format: label_db, path: labels.sqlite, split: all}"))
    assert len(load_datasets(recipe.data, tmp_path / "r.yaml")["prefs"]) == labelled

    missing = _recipe(tmp_path, "{format: label_db, path: nowhere.sqlite}")
    out = tmp_path / "run"
    assert main(["run", str(missing), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"lmcycle: error: {missing}: field 'data.prefs.path': no label database at "
                   f"{tmp_path / 'nowhere.sqlite'} (create one with `lmcycle label init --db ...`)")
    assert not out.exists()  # found before the run directory is made
    recipe, _ = load_recipe(_recipe(tmp_path, "{format: label_db, path: labels.sqlite, project: nope}"))
    with pytest.raises(LmcycleError) as e:
        load_datasets(recipe.data, tmp_path / "r.yaml")
    assert (e.value.file, e.value.field) == (str(tmp_path / "r.yaml"), "data.prefs.project")
    assert e.value.message.startswith("no project 'nope'")


def test_a_database_url_given_on_the_command_line_is_kept_as_written(tmp_path, db_url, labelled):
    """Command-line paths are made absolute against the working directory; a Postgres URL is no path."""
    recipe, _ = load_recipe(_recipe(tmp_path, "{format: label_db, path: elsewhere.sqlite, split: all}"),
                            [f"data.prefs.path={db_url}"])
    assert recipe.data["prefs"].path == db_url
    assert len(load_datasets(recipe.data, tmp_path / "r.yaml")["prefs"]) == labelled


def test_an_unlabelled_project_and_project_on_another_format_are_errors(tmp_path, store, db_url):
    with pytest.raises(LmcycleError, match="project 'default' has no labels yet") as e:
        load_examples(DatasetConfig(format="label_db", path=db_url))
    assert e.value.field == "project" and "(project default)" in e.value.file
    with pytest.raises(LmcycleError) as e:
        load_recipe(_recipe(tmp_path, "{format: rankings, path: x.jsonl, project: default}"))
    assert (e.value.line, e.value.field) == (3, "data.prefs")
    assert e.value.message == "'project' only applies to format 'label_db'"
