"""The network edge: the safe URL fetcher (SSRF-checked, size-capped, resumable ``.part`` files).

Used by the weights sources (LoRA and checkpoint URLs), image inputs and webhooks. It imports
nothing else of Easel except storage (to read the server's own URLs locally).
"""
