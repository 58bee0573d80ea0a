"""NVFlare client script: answers the export_bundle task with this site's secure-oneshot bundle (or a refusal)."""

from secure_oneshot.integrations.nvflare.client import main

main()
