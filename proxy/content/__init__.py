"""The content paths: pull-through, push, single-flight fills and referrers."""
