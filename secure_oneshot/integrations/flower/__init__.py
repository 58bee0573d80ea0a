"""The one transfer as a Flower app: a ClientApp at each hospital answers one query with its bundle, a ServerApp
collects the replies into the inbox and runs ``ingest``.

``site`` and ``server`` hold the logic and import no ``flwr``; ``client_app`` and ``server_app`` hold the Flower
objects (``flwr`` is the optional extra ``flower``).  The app folder for ``flwr run`` is ``examples/flower/``.
"""

BUNDLE_STYPE = "secure-oneshot/bundle-v1"   # the Array's stype: one opaque bundle file, dtype uint8, shape [n]
QUERY_ACTION = "export_bundle"              # the ClientApp's query action ("query.export_bundle")
REQUEST_ID_KEY = "request-id"               # the only field of the server's request the site uses
