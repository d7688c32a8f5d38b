"""A minimal Django site that enqueues LLaVA-NeXT jobs through the torch-free ``producer`` package."""
