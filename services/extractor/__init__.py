"""The extractor service: plans sub-models for device profiles and streams their weight slices, resumably."""
