"""What a plan costs: counted, modelled and measured, in one place.

- ``costs``: counted. FLOPs, parameters, weight and activation bytes of a graph or a node
  (``node_flops``), and the bytes of the data-parallel and layer-wise alternatives;
- ``modelled``: the modelled time of a node on a device, as the planning passes weigh it
  (no measurement: FLOPs and weight bytes over reference rates);
- ``measured``: stage and model times measured on this machine with onnxruntime;
- ``network``: the deployment (``Network``: devices, links, route) and the predicted
  per-inference latency of a written folder on it (stage times measured, links modelled);
- ``devices``: the ``devices.yaml`` parser that builds a ``Network``;
- ``latency_report``: ``lcpc report --network``: measures, predicts and renders.

Guarantees: nothing here changes a plan or a folder; ``modelled`` and ``costs`` do no I/O.
"""
