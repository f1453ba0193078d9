"""lmcycle.adapt"""
