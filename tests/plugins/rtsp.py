"""RTSP server fixtures (filled in with the camera ingest work)."""
