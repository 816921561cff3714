"""Tools around the study: notebook batches (`sweep`) and speed measurements (`bench`)."""
