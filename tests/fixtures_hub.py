"""Fixtures for tests that talk to the Hub: a loopback fake Hub, and huggingface_hub pointed at it.

conftest.py imports huggingface_hub offline (`HF_HUB_OFFLINE=1`) with the real endpoint. huggingface_hub reads
`constants.ENDPOINT` and `constants.HF_HUB_OFFLINE` when a request is made, and every `HfApi()` created later
takes the endpoint from `constants.ENDPOINT`; so a test can go online against the fake hub by patching those,
and undo it afterwards. Two ways to use it:

- In process: request `hub_online` (it implies `fake_hub`). For the test's duration it sets
  `huggingface_hub.constants.ENDPOINT` (and the download URL template `HUGGINGFACE_CO_URL_TEMPLATE`, built
  from it at import) to the fake hub's URL and `HF_HUB_OFFLINE` to False, points the
  module-level `HfApi` behind `huggingface_hub.whoami()` (which gradio's mocked sign-in calls) at it, and sets
  the env vars in `fake_hub.env`: `HF_ENDPOINT`, `HF_HUB_OFFLINE=0` and `HF_TOKEN=SPACE_OWNER_TOKEN` (the
  Space owner's token: gradio's local sign-in mock needs one, and a push must never use it). All of it is
  restored after the test (monkeypatch), so other tests stay offline.
- In a subprocess: pass `env={**os.environ, **fake_hub.env}`: the child imports huggingface_hub with
  `HF_ENDPOINT` already set, as a Space does.

`fake_hub` is a started `tests.fake_hub.FakeHub` (its doc lists the routes) with these accounts: `SPACE_OWNER`
/ `SPACE_OWNER_TOKEN`, `VISITOR` / `VISITOR_TOKEN` (write access, member of org `VISITOR_ORG`), `VISITOR` /
`READ_TOKEN` (read-only token), `VISITOR` / `NO_WRITE_TOKEN` (a fine-grained token without write permission:
whoami cannot tell, the Hub answers 403), and `OTHER` / `OTHER_TOKEN` who owns the public repo `OTHER_REPO`.
After a push, read `fake_hub.commits` (repo_id, summary, decoded `files`, token),
`fake_hub.repos[repo_id].private`, `fake_hub.tokens_seen()`, `fake_hub.routes_seen()`, `fake_hub.requests`.
Off a Space, gradio's mocked sign-in calls whoami with the owner's `HF_TOKEN` when the app is built: check the
push's own routes with `fake_hub.tokens_seen("create_repo", "preupload", "commit")`. Inject failures with
`fake_hub.fail["commit"] = 500` or `"drop"` (closes the connection: a network failure).

Example for the app's `/push` endpoint:

    def test_push_endpoint(hub_online, fake_hub, app_url):
        client = gradio_client.Client(app_url, oauth_token=VISITOR_TOKEN)
        client.predict(..., api_name="/push")
        assert len(fake_hub.commits) == 1
        assert fake_hub.tokens_seen("create_repo", "commit") == {VISITOR_TOKEN}

(checked: an in-process `gr.Blocks` with `gr.LoginButton()` launched under `hub_online` builds, and a handler
taking `gr.OAuthToken | None` receives `VISITOR_TOKEN` from `Client(url, oauth_token=VISITOR_TOKEN)`.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from huggingface_hub import constants, hf_api

from tests.fake_hub import FakeHub

VISITOR = "alice"
VISITOR_ORG = "alice-lab"
VISITOR_TOKEN = "hf_test_alice_write_0123456789"
READ_TOKEN = "hf_test_alice_read_0123456789"
NO_WRITE_TOKEN = "hf_test_alice_finegrained_0123456789"
OTHER = "bob"
OTHER_TOKEN = "hf_test_bob_write_0123456789"
OTHER_REPO = f"{OTHER}/flux-style-rank4"
SPACE_OWNER = "space-owner"
SPACE_OWNER_TOKEN = "hf_test_space_owner_0123456789"


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    """A fake Hub serving on 127.0.0.1 for one test, with the accounts described in this module's doc."""
    hub = FakeHub()
    hub.add_user(VISITOR, VISITOR_TOKEN, orgs=[VISITOR_ORG])
    hub.add_user(VISITOR, READ_TOKEN, role="read")
    hub.add_user(VISITOR, NO_WRITE_TOKEN, role="fineGrained", can_write=False)
    hub.add_user(OTHER, OTHER_TOKEN)
    hub.add_user(SPACE_OWNER, SPACE_OWNER_TOKEN)
    hub.add_repo(OTHER_REPO)
    with hub:
        hub.env["HF_TOKEN"] = SPACE_OWNER_TOKEN
        yield hub


@pytest.fixture
def hub_online(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """huggingface_hub (in this process and in subprocesses started by the test) talks to `fake_hub`."""
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", fake_hub.url)
    for name, value in fake_hub.env.items():
        monkeypatch.setenv(name, value)
    return fake_hub
