"""The NVFlare job definition (FedJob API): the controller on the server, the client script at every site.

``python -m secure_oneshot.integrations.nvflare.job --server-config /srv/nvflare-server.toml --export /tmp/jobs``
writes the job folder ``/tmp/jobs/secure-oneshot-transfer`` for ``nvflare simulator`` or ``nvflare job submit``.
The job asks for the privacy scope ``secure-oneshot``: each site's ``local/privacy.json`` declares that scope with the
site's own result filter (``site_filter``); NVFlare makes a site whose ``privacy.json`` lacks the scope refuse the
job, while a site with no ``privacy.json`` at all runs it without the filter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import ScriptRunner

from .controller import BundleController

__all__ = ["make_job", "JOB_NAME", "PRIVACY_SCOPE", "CLIENT_SCRIPT"]

JOB_NAME = "secure-oneshot-transfer"
PRIVACY_SCOPE = "secure-oneshot"
CLIENT_SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "nvflare" / "export_client.py"
"""A two-line script that calls ``client.main``; NVFlare copies it into the job (the package itself is installed)."""


def make_job(server_config: str, min_clients: int = 1, client_script: Path = CLIENT_SCRIPT) -> FedJob:
    job = FedJob(name=JOB_NAME, min_clients=min_clients, meta_props={"scope": PRIVACY_SCOPE})
    job.set_app_packages(["secure_oneshot"])   # installed at every site and at the server: not copied into the job
    job.to_server(BundleController(server_config=server_config))
    job.to_clients(ScriptRunner(script=str(client_script), framework=FrameworkType.RAW, server_expected_format="raw"))
    return job


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the secure-oneshot NVFlare job folder.")
    parser.add_argument("--server-config", required=True, help="the server's settings file, as the server machine sees it")
    parser.add_argument("--min-clients", type=int, default=1)
    parser.add_argument("--export", required=True, help="folder to write the job into")
    args = parser.parse_args(argv)
    make_job(args.server_config, args.min_clients).export_job(args.export)
    print(Path(args.export) / JOB_NAME)


if __name__ == "__main__":
    main()
