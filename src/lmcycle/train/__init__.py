"""lmcycle.train"""
