"""The `genq` command: run the services, manage the database and keys, and submit or follow
jobs and batches through the HTTP API. A failure prints one line, `error: CODE: message`, and
exits non-zero; never a traceback."""

from __future__ import annotations

import os

import click
import requests

from cli.admin import keys, prune, tenants
from cli.batch import batch
from cli.context import CommandFailed
from cli.jobs import cancel, get, list_jobs, submit
from cli.models import models
from cli.services import api, db_group, up, webhook_worker, worker
from genq.settings import get_settings
from producer.client import GenqAPIError

HELP_WIDTH = 100


class GenqGroup(click.Group):
    """Turns the errors a user meets (an API error answer, an API that does not answer, a job
    that is still running) into one line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GenqAPIError as exc:
            param = f" (param: {exc.param})" if exc.param else ""
            raise CommandFailed(exc.code, f"{exc.message}{param} [HTTP {exc.status}]") from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL) as exc:
            raise CommandFailed(
                "bad_api_url",
                f"GENQ_API_URL={get_settings().api_url!r} is not an API address like "
                f"http://127.0.0.1:8000 ({exc})") from None
        except requests.ConnectionError:
            raise CommandFailed(
                "api_unreachable",
                f"no genq API answers at {get_settings().api_url}: start it with `genq up`, "
                "or set GENQ_API_URL") from None
        except requests.Timeout:
            raise CommandFailed("api_timeout",
                                f"the API at {get_settings().api_url} did not answer in time"
                                ) from None
        except TimeoutError as exc:
            raise CommandFailed("timeout", str(exc)) from None


@click.group(cls=GenqGroup, context_settings={"max_content_width": HELP_WIDTH,
                                              "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genq", prog_name="genq")
def main() -> None:
    """genq: a self-hosted job system for LLM text generation.

    Start with `genq up`, then `genq keys create NAME` and `GENQ_API_KEY=… genq submit "Hi"`.
    Run commands from the directory where `genq up` runs, or set GENQ_DATA_DIR.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The progress bars of loading weights and of a GGUF conversion (hundreds of redraws in a
    # log) are Hugging Face's; the services below log one line per step instead.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


for command in (up, api, worker, webhook_worker, db_group, keys, tenants, prune,
                submit, get, list_jobs, cancel, batch, models):
    main.add_command(command)
