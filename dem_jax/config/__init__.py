"""Typed configuration, and the one loader that reads it from YAML.

``model`` (ModelConfig: the architecture), ``run`` (RunConfig: one run of training,
search and the pipeline), ``merge`` (MergeConfig: a mergekit MERGE.yaml) and
``loader`` (dataclasses from YAML with dotted overrides and errors naming the file
and key).
"""
