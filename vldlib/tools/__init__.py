"""Tools around the study: notebook batches (`sweep`), speed measurements (`bench`) and the
notebooks' git clean filter (`notebook_filter`)."""
