"""The hospital's NVFlare client script (Client API): answers each ``export_bundle`` task with the site's bundle.

Run by NVFlare's ``ScriptRunner`` at each site (``job.py`` adds it).  The site's settings come from the client's
environment (``site.site_config_path``), never from the task; the reply is what ``site.answer_task`` returns: the
bundle file as one uint8 array plus its public header fields, or a refusal with the reason only.  The site's
``local/privacy.json`` filter (``site_filter``) then decides whether it may leave.
"""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from . import TASK_NAME
from .site import answer_task, refusal

__all__ = ["answer", "main"]


def answer(task: FLModel, site_name: str) -> FLModel:
    """The reply to one ``export_bundle`` task: the site's bundle, or a refusal with the reason only."""
    params, meta = answer_task(site_name, task.meta or {}, task.params)
    return FLModel(params=params, params_type=ParamsType.FULL, meta=meta)


def main() -> None:
    import nvflare.client as flare

    flare.init()
    site_name = flare.get_site_name()
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        if flare.get_task_name() != TASK_NAME:
            params, meta = refusal(f"this site answers only the {TASK_NAME} task")
            flare.send(FLModel(params=params, params_type=ParamsType.FULL, meta=meta))
            continue
        flare.send(answer(task, site_name))


if __name__ == "__main__":
    main()
