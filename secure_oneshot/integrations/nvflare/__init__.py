"""The one transfer as an NVFlare job: a client script at each hospital answers one task with its bundle, a
``ModelController`` on the server collects the replies into the inbox and runs ``ingest``, and a site-owned task
result filter (declared in the site's ``local/privacy.json``) lets nothing else leave.

``site``, ``result_check`` and ``server`` hold the logic and import no ``nvflare``; ``client``, ``controller``,
``site_filter`` and ``job`` hold the NVFlare objects (``nvflare`` is the optional extra ``nvflare``).  The example
job and site files are in ``examples/nvflare/``.
"""

TASK_NAME = "export_bundle"          # the one task the controller sends
BUNDLE_PARAM = "bundle"              # the reply's only parameter: the bundle file as a 1-D uint8 array
REQUEST_META = "secure-oneshot"      # the task's meta entry the site reads: {"request-id": <str>}; nothing else counts
STATUS_KEY = "status"                # reply meta: "bundle" (with the public header fields) or "refused" (with "reason")
REASON_KEY = "reason"
SITE_CONFIG_ENV = "SECURE_ONESHOT_NVFLARE_SITE"
"""The site's settings file, set in the environment of the hospital's NVFlare client (never by the job)."""
SITES_DIR_ENV = "SECURE_ONESHOT_NVFLARE_SITES"
"""For the simulator (all sites on one machine): the settings are ``$SECURE_ONESHOT_NVFLARE_SITES/<site-name>.toml``."""
