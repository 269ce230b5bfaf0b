"""Running in the cloud, a leaf of the package: Vertex AI custom-job submission (`vertex`), the
distributed launch on a node or cluster (`launch`), and the AIP_* contract inside a Vertex job
(`aip`). It imports `config` and the object-store interface (`checkpoints.storage`) only."""
