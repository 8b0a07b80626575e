"""Tasks and data: graders, the embedded arithmetic world, preference pairs, feature stores."""
