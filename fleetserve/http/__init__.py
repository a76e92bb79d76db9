"""HTTP helpers shared by both doors, the replica server and the gateway: binding the
listening socket, server-sent events, OpenAI error bodies, and stopping work when the client
leaves. Torch-free (the gateway imports it)."""
