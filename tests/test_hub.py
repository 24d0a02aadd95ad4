"""Pushing a resized LoRA with the real huggingface_hub client to a loopback fake Hub (tests/fake_hub.py).

The resized file and its report come from the real core (`lora_ops.resize_file`) on a synthetic FLUX-layout
LoRA (all 494 FLUX.1 modules, hidden size 64). `assets/example-model-card.md` is the card of the push in
`test_example_card_is_the_card_a_push_renders`, which checks that the example still matches what the code
renders (metadata, headings, table rows); rewrite it with `UPDATE_EXAMPLE_CARD=1`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants
from PIL import Image

import lora_ops
from lora_ops import sources, synthetic
from lora_ops.hub import PushResult, push_resized
from tests.fixtures_hub import (
    NO_WRITE_TOKEN,
    OTHER,
    OTHER_REPO,
    READ_TOKEN,
    SPACE_OWNER_TOKEN,
    VISITOR,
    VISITOR_ORG,
    VISITOR_TOKEN,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CARD = ROOT / "assets" / "example-model-card.md"
SOURCE = "tiny-flux-style"
REPO_ID = f"{VISITOR}/{SOURCE}-rank4"
WEIGHTS = f"{SOURCE}-svd-rank4.safetensors"
PROMPTS = ("a red fox in fresh snow", "a lighthouse at dusk, oil painting")
KNOWN_ROUTES = {"whoami", "create_repo", "repo_info", "validate_yaml", "preupload", "commit"}


def _resize(folder: Path, config: dict | None = None) -> tuple[Path, dict]:
    """A synthetic FLUX-layout LoRA of rank 8 (494 modules, hidden 64) resized to rank 4: (file, report)."""
    source = folder / "in" / f"{SOURCE}.safetensors"
    source.parent.mkdir(parents=True)
    shapes = synthetic.flux_shapes(hidden=64, mlp_ratio=2)
    synthetic.save_lora(synthetic.make_lora(shapes, 8, seed=0), source)
    if config is not None:
        (source.parent / "adapter_config.json").write_text(json.dumps(config))
    resized = folder / "out" / "resized.safetensors"
    resized.parent.mkdir()
    return resized, lora_ops.resize_file(source, resized, lora_ops.ResizeOptions(rank=4))


@pytest.fixture(scope="module")
def resized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return _resize(tmp_path_factory.mktemp("resized"))


@pytest.fixture
def grids(tmp_path: Path) -> list:
    """Two preview grids as the Space's gallery gives them: (PIL image or image path, prompt)."""
    on_disk = tmp_path / "grid.png"
    Image.new("RGB", (48, 32), "navy").save(on_disk)
    return [(Image.new("RGB", (64, 32), "orange"), PROMPTS[0]), (str(on_disk), PROMPTS[1])]


@pytest.fixture
def pushed(hub_online, resized, grids) -> tuple[PushResult, dict]:
    """One push with every option: the result and the fake hub's record of the commit."""
    resized_file, report = resized
    result = push_resized(
        VISITOR_TOKEN,
        resized_file,
        report,
        private=True,
        grid_images=grids,
        metrics={"LPIPS vs source": 0.01234567, "seed": "0"},
        license="apache-2.0",
    )
    return result, hub_online.commits[0]


def _push_error(hub, resized, token=VISITOR_TOKEN, **options) -> str:
    """Push expecting a LoraError; check it is one line without the token and that nothing was committed."""
    resized_file, report = resized
    with pytest.raises(lora_ops.LoraError) as caught:
        push_resized(token, resized_file, report, **options)
    message = str(caught.value)
    assert "\n" not in message
    assert not token or token not in message
    assert hub.commits == []
    return message


def _table(markdown: str, heading: str) -> dict[str, str]:
    """The two-column table under `## heading` as {first cell: second cell}."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {name.strip(): value.strip() for name, value in rows}


def test_push_makes_one_commit_with_weights_report_grids_and_card(hub_online, resized, pushed):
    resized_file, report = resized
    result, commit = pushed
    assert len(hub_online.commits) == 1
    assert commit.repo_id == REPO_ID
    assert sorted(commit.files) == [
        "README.md",
        "images/grid-1.png",
        "images/grid-2.png",
        "resize-report.json",
        WEIGHTS,
    ]
    assert result == PushResult(
        repo_id=REPO_ID,
        repo_url=f"{hub_online.url}/{REPO_ID}",
        commit_url=f"{hub_online.url}/{REPO_ID}/commit/{commit.oid}",
        files=tuple(sorted(commit.files)),
    )
    assert commit.files[WEIGHTS] == resized_file.read_bytes()
    pushed_report = json.loads(commit.files["resize-report.json"])
    assert pushed_report == {**report, "output": {**report["output"], "file": WEIGHTS}}
    sizes = [Image.open(io.BytesIO(commit.files[f"images/grid-{i}.png"])).size for i in (1, 2)]
    assert sizes == [(64, 32), (48, 32)]
    assert set(hub_online.routes_seen()) <= KNOWN_ROUTES


def test_the_hub_sees_only_the_visitors_token_and_no_file_contains_it(hub_online, pushed):
    _, commit = pushed
    assert hub_online.tokens_seen() == {VISITOR_TOKEN}
    assert os.environ["HF_TOKEN"] == SPACE_OWNER_TOKEN
    assert all(VISITOR_TOKEN.encode() not in content for content in commit.files.values())
    assert VISITOR_TOKEN not in commit.summary + commit.description


def test_card_yaml_has_base_model_license_tags_and_gallery(hub_online, pushed):
    _, commit = pushed
    readme = commit.files["README.md"].decode()
    assert hub_online.validated_cards == [readme]
    data = ModelCard(readme).data
    assert data.base_model == "black-forest-labs/FLUX.1-dev"
    assert data.library_name == "diffusers"
    assert data.license == "apache-2.0"
    assert data.tags == ["lora", "text-to-image", "flux", "lora-resize"]
    assert data.widget == [
        {"text": PROMPTS[0], "output": {"url": "images/grid-1.png"}},
        {"text": PROMPTS[1], "output": {"url": "images/grid-2.png"}},
    ]
    assert "<Gallery />" in readme


def test_card_provenance_table_metrics_and_loading_snippet(resized, pushed):
    _, report = resized
    _, commit = pushed
    readme = commit.files["README.md"].decode()
    provenance = _table(readme, "Provenance")
    assert provenance["Source"] == f"`{SOURCE}.safetensors`"
    assert provenance["Source sha256"] == f"`{report['source']['sha256']}`"
    assert provenance["Method"] == "`svd` (rank=4, dtype=keep)"
    assert provenance["Ranks before"] == "rank 8 (494 modules)"
    assert provenance["Ranks after"] == "rank 4 (494 modules)"
    assert provenance["Size"] == f"{report['bytes_in'] / 1e6:.1f} MB -> {report['bytes_out'] / 1e3:.1f} kB"
    assert provenance["Relative error"].startswith(
        f"median {report['median_error']:.2%}, worst {report['worst_error']:.2%} (`{report['worst_layer']}`)"
    )
    assert _table(readme, "Preview metrics") == {"metric": "value", "LPIPS vs source": "0.01235", "seed": "0"}
    assert f'pipe.load_lora_weights("{REPO_ID}", weight_name="{WEIGHTS}")' in readme
    assert f"pipe({json.dumps(PROMPTS[0])})" in readme


def _outline(card: str) -> tuple[dict, list[str], dict[str, list[str]]]:
    """What a card says apart from numbers that vary with the machine: YAML, headings, table row names."""
    headings = [line for line in card.splitlines() if line.startswith("#")]
    tables = {h[3:]: list(_table(card, h[3:])) for h in headings if h.startswith("## ")}
    return ModelCard(card).data.to_dict(), headings, tables


def test_example_card_is_the_card_a_push_renders(pushed):
    readme = pushed[1].files["README.md"].decode()
    if os.environ.get("UPDATE_EXAMPLE_CARD") == "1":
        EXAMPLE_CARD.write_text(readme, encoding="utf-8")
    example = EXAMPLE_CARD.read_text(encoding="utf-8")
    assert _outline(example) == _outline(readme), "rerun with UPDATE_EXAMPLE_CARD=1 to refresh the example card"


@pytest.mark.parametrize("private", [False, True])
def test_private_flag_sets_the_new_repos_visibility(hub_online, resized, private):
    push_resized(VISITOR_TOKEN, *resized, private=private)
    assert hub_online.repos[REPO_ID].private is private


def test_card_of_a_source_repo_on_sdxl_links_the_source_and_tags_the_family(hub_online, resized):
    result = push_resized(
        VISITOR_TOKEN,
        *resized,
        source="someone/Paper-Cut_Style",
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        grid_images=[(Image.new("RGB", (8, 8)), "a fox, ```paper cut``` style")],
    )
    assert result.repo_id == f"{VISITOR}/Paper-Cut_Style-rank4"
    assert "Paper-Cut_Style-svd-rank4.safetensors" in result.files
    readme = hub_online.commits[0].files["README.md"].decode()
    data = ModelCard(readme).data
    assert data.tags == ["lora", "text-to-image", "sdxl", "lora-resize"]
    assert data.license is None
    assert ModelCard(readme).text.count("```") == 2, "a prompt with backticks must not end the snippet's code block"
    assert _table(readme, "Provenance")["Source"] == (
        f"[someone/Paper-Cut_Style](https://huggingface.co/someone/Paper-Cut_Style), file `{SOURCE}.safetensors`"
    )


def test_mixed_ranks_from_an_energy_target_name_the_range(hub_online, tmp_path):
    shapes = synthetic.flux_shapes(num_double=1, num_single=1, hidden=64, mlp_ratio=2)
    steep, flat = dict(list(shapes.items())[:10]), dict(list(shapes.items())[10:])
    source = tmp_path / "mixed.safetensors"
    synthetic.save_lora(synthetic.make_lora(steep, 8, decay=1.0) | synthetic.make_lora(flat, 8, decay=4.0), source)
    report = lora_ops.resize_file(source, tmp_path / "out.safetensors", lora_ops.ResizeOptions(energy=0.99))
    low, high = sorted(int(rank) for rank in report["rank_out"])
    result = push_resized(VISITOR_TOKEN, tmp_path / "out.safetensors", report)
    assert result.repo_id == f"{VISITOR}/mixed-rank{low}-{high}"
    assert f"mixed-svd-rank{low}-{high}.safetensors" in result.files
    readme = hub_online.commits[0].files["README.md"].decode()
    after = _table(readme, "Provenance")["Ranks after"]
    assert (
        after
        == f"ranks {low}-{high} ({report['rank_out'][str(low)]} at {low}, {report['rank_out'][str(high)]} at {high})"
    )


@pytest.mark.parametrize(
    "repo_id, expected",
    [
        ("my-lora", f"{VISITOR}/my-lora"),
        (" my-lora ", f"{VISITOR}/my-lora"),
        ("", REPO_ID),
        (f"{VISITOR_ORG}/team-lora", f"{VISITOR_ORG}/team-lora"),
    ],
)
def test_repo_name_goes_under_the_visitor_or_their_org(hub_online, resized, repo_id, expected):
    result = push_resized(VISITOR_TOKEN, *resized, repo_id=repo_id)
    assert result.repo_id == expected
    assert [commit.repo_id for commit in hub_online.commits] == [expected]


def test_pushing_again_to_an_existing_own_repo_adds_one_commit(hub_online, resized):
    push_resized(VISITOR_TOKEN, *resized)
    push_resized(VISITOR_TOKEN, *resized)
    assert [commit.repo_id for commit in hub_online.repos[REPO_ID].commits] == [REPO_ID, REPO_ID]


def test_peft_config_written_by_the_core_is_pushed_with_the_weights(hub_online, tmp_path):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["to_q", "to_k"]}
    resized_file, report = _resize(tmp_path, config)
    assert report["output"]["config"]
    push_resized(VISITOR_TOKEN, resized_file, report)
    files = hub_online.commits[0].files
    assert json.loads(files["adapter_config.json"]) == json.loads(
        (resized_file.parent / "adapter_config.json").read_text()
    )
    assert json.loads(files["adapter_config.json"])["r"] == 4
    assert str(tmp_path).encode() not in files["resize-report.json"]


def test_missing_peft_config_is_refused_before_any_request(hub_online, tmp_path):
    resized_file, report = _resize(tmp_path, {"peft_type": "LORA", "r": 8, "lora_alpha": 8})
    (resized_file.parent / "adapter_config.json").unlink()
    message = _push_error(hub_online, (resized_file, report))
    assert message == "the PEFT config written beside the resized file is missing: adapter_config.json"
    assert hub_online.requests == []


@pytest.mark.parametrize("token", [None, ""])
def test_not_signed_in_is_refused_before_any_request(hub_online, resized, token):
    assert _push_error(hub_online, resized, token).startswith("not signed in")
    assert hub_online.requests == []


@pytest.mark.parametrize("repo_id", ["bad--name", f"{VISITOR}/a/b", "-leading", "has space", "x" * 97, "lora.git"])
def test_invalid_repo_name_is_refused_before_any_request(hub_online, resized, repo_id):
    assert _push_error(hub_online, resized, repo_id=repo_id).startswith(f"invalid repo name {repo_id!r}")
    assert hub_online.requests == []


def test_unreadable_grid_image_is_refused_before_any_request(hub_online, resized, tmp_path):
    not_an_image = tmp_path / "grid.png"
    not_an_image.write_text("not a png")
    message = _push_error(hub_online, resized, grid_images=[not_an_image])
    assert message == "grid image grid.png is not a readable image"
    assert hub_online.requests == []


def test_read_only_token_is_refused_before_creating_a_repo(hub_online, resized):
    message = _push_error(hub_online, resized, READ_TOKEN)
    assert message == "your token is read-only: pushing needs a token with write access"
    assert hub_online.routes_seen() == ["whoami"]
    assert hub_online.repos.keys() == {OTHER_REPO}


def test_token_without_write_permission_fails_at_repo_creation(hub_online, resized):
    message = _push_error(hub_online, resized, NO_WRITE_TOKEN)
    assert message.startswith(f"your token may not create {REPO_ID} (HTTP 403): it needs write access")
    assert "commit" not in hub_online.routes_seen()


def test_rejected_token_asks_to_sign_in_again(hub_online, resized):
    message = _push_error(hub_online, resized, "hf_expired_or_revoked")
    assert message == "the Hub refused your token while trying to check your account (HTTP 401): sign in again"


def test_repo_that_belongs_to_someone_else_is_refused_before_creating(hub_online, resized):
    message = _push_error(hub_online, resized, repo_id=OTHER_REPO)
    assert message == f"repo {OTHER_REPO} exists and belongs to {OTHER}: choose a name under {VISITOR}/"
    assert "create_repo" not in hub_online.routes_seen()
    assert hub_online.repos[OTHER_REPO].commits == []


def test_new_repo_under_someone_elses_name_is_refused(hub_online, resized):
    message = _push_error(hub_online, resized, repo_id=f"{OTHER}/new-lora")
    assert message == f"you cannot create repos under {OTHER}: choose a name under {VISITOR}/"
    assert "create_repo" not in hub_online.routes_seen()


@pytest.mark.parametrize(
    "route, failure, message",
    [
        ("commit", "drop", f"network failure while trying to upload to {REPO_ID}: could not reach the Hub; try again"),
        ("commit", 500, f"the Hub failed to upload to {REPO_ID} (HTTP 500); nothing was published, try again later"),
        ("create_repo", 503, f"the Hub failed to create {REPO_ID} (HTTP 503); nothing was published, try again later"),
        ("validate_yaml", 400, "the Hub rejected the model card's metadata; nothing was published"),
    ],
)
def test_hub_failure_leaves_no_commit(hub_online, resized, route, failure, message):
    hub_online.fail[route] = failure
    assert _push_error(hub_online, resized) == message
    assert hub_online.routes_seen().count(route) == 1


def test_unreachable_hub_is_a_network_failure(hub_online, resized):
    hub_online.stop()
    message = _push_error(hub_online, resized)
    assert message == "network failure while trying to check your account: could not reach the Hub; try again"


def test_push_from_a_process_that_imports_huggingface_hub_with_hf_endpoint_set(fake_hub, resized, tmp_path):
    """The Space's way: HF_ENDPOINT is in the environment before huggingface_hub is imported."""
    resized_file, report = resized
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(report))
    script = (
        "import json, sys\n"
        "from lora_ops.hub import push_resized\n"
        "result = push_resized(sys.argv[1], sys.argv[2], json.loads(open(sys.argv[3]).read()))\n"
        "print(result.commit_url)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, VISITOR_TOKEN, str(resized_file), str(report_path)],
        env={**os.environ, **fake_hub.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    assert [commit.repo_id for commit in fake_hub.commits] == [REPO_ID]
    assert child.stdout.strip() == f"{fake_hub.url}/{REPO_ID}/commit/{fake_hub.commits[0].oid}"
    assert fake_hub.tokens_seen() == {VISITOR_TOKEN}


@pytest.mark.parametrize(
    "failure, problem",
    [
        (500, "the Hub failed to {action} (HTTP 500); try again later"),
        ("drop", "network failure while trying to {action}: could not reach the Hub; try again"),
        ("offline", "cannot reach the Hub to {action}: this machine is offline (HF_HUB_OFFLINE is set)"),
    ],
)
def test_reading_a_repo_gets_the_same_one_line_messages_as_a_push(hub_online, monkeypatch, tmp_path, failure, problem):
    """`lora_ops.sources` maps the Hub's failures with the table a push uses (`HUB_ERRORS`)."""
    if failure == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        hub_online.fail["paths_info"] = failure
    with pytest.raises(lora_ops.LoraError) as caught:
        sources.download_lora(OTHER_REPO, "lora.safetensors", tmp_path, token=VISITOR_TOKEN, max_bytes=10**6)
    assert str(caught.value) == problem.format(action=f"download lora.safetensors from {OTHER_REPO}")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    # the commit is resolved first (one revision for the size check and the download), then its paths are read
    assert hub_online.routes_seen() == ([] if failure == "offline" else ["repo_info", "paths_info"])
